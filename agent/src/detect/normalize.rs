//! Shapes: the parts of a path or command line that stay the same between
//! two runs of the same behaviour, so a baseline learned once still matches
//! tomorrow while a different command is a different shape.
//!
//! How a shape is formed, token by token (a token is a run of letters,
//! digits and `_`; everything else, `/ . - = :` and spaces, is kept as is,
//! so directories, extensions and flag names survive):
//!
//! - a UUID (`8-4-4-4-12` hex) becomes `U`;
//! - a hex-looking token (8+ hex characters with a digit and a letter:
//!   hashes, commit ids, container ids) becomes `H`;
//! - so does a random-looking token, wherever it appears (one draw may
//!   happen to be all hex, the next not): 6+
//!   characters that switch between lower case, upper case, digits and `_`
//!   at least 4 times (`ccAbC123`, `tmpk3j_x9az`), or 20+ characters mixing
//!   letters and digits (tokens, request ids). Words, `camelCase` names
//!   and versioned names (`python3`, `x86_64`) switch less and are kept;
//! - a mktemp-style suffix after a dot (`name.XXXXXXXX`: 6 to 10 letters
//!   and digits mixing case or letters and digits, not a capitalized word
//!   nor a name ending in a version, `conf.SlfYPMUL`, `scn.gFTWzN`) becomes
//!   `H`: few case switches, but no word looks like that;
//! - every other run of digits becomes `N` (pids, ports, counters);
//! - under a temporary root (`/tmp/`, `/var/tmp/`, `/dev/shm/`,
//!   `/run/user/`) every alphanumeric run of 6+ characters becomes `*`
//!   (mktemp draws can be plain lower case).

use std::borrow::Cow;

/// Temporary roots whose first component is random (mktemp).
const TEMP_ROOTS: &[&str] = &["/tmp/", "/var/tmp/", "/dev/shm/", "/run/user/"];

/// The shape of `text` (see the module documentation).
pub fn shape(text: &str) -> String {
    let masked_tmp = mask_temp_dirs(text);
    let masked = mask_uuids(&masked_tmp);
    let masked: &str = &masked;
    let mut out = String::with_capacity(masked.len());
    let mut after_dot = false;
    for tok in split_keep(masked) {
        if is_hexish(tok) || is_random(tok) || (after_dot && is_mktemp_suffix(tok)) {
            out.push('H');
        } else {
            mask_digits(tok, &mut out);
        }
        after_dot = tok.ends_with('.');
    }
    out
}

/// The random part of `mktemp name.XXXXXXXX` (see the module
/// documentation).
fn is_mktemp_suffix(tok: &str) -> bool {
    let b = tok.as_bytes();
    if !(6..=10).contains(&b.len()) || !b.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let lower = b.iter().any(u8::is_ascii_lowercase);
    let upper = b.iter().any(u8::is_ascii_uppercase);
    let digit = b.iter().any(u8::is_ascii_digit);
    let capitalized = b[0].is_ascii_uppercase() && b[1..].iter().all(u8::is_ascii_lowercase);
    // `python311`, `libfoo12`: lower-case letters then a version (a draw
    // mixing case, `pDfl42`, is no name).
    let versioned = {
        let letters = b.iter().take_while(|c| c.is_ascii_lowercase()).count();
        letters > 0 && letters < b.len() && b[letters..].iter().all(u8::is_ascii_digit)
    };
    lower && (upper || digit) && !capitalized && !versioned
}

/// UUIDs (`8-4-4-4-12` hex digits) replaced by `U`.
fn mask_uuids(text: &str) -> Cow<'_, str> {
    let b = text.as_bytes();
    if b.len() < 36 || !text.contains('-') {
        return Cow::Borrowed(text);
    }
    let is_uuid_at = |i: usize| {
        i + 36 <= b.len()
            && b[i..i + 36].iter().enumerate().all(|(j, c)| match j {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            })
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric())
            && b.get(i + 36).is_none_or(|c| !c.is_ascii_alphanumeric())
    };
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if is_uuid_at(i) {
            out.push('U');
            i += 36;
        } else {
            let c = text[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    Cow::Owned(out)
}

/// A token that looks drawn at random rather than written (see the module
/// documentation).
fn is_random(tok: &str) -> bool {
    if tok.len() < 6 || !tok.is_ascii() {
        return false;
    }
    let class = |c: u8| match c {
        b'a'..=b'z' => 0,
        b'A'..=b'Z' => 1,
        b'0'..=b'9' => 2,
        _ => 3,
    };
    let b = tok.as_bytes();
    let switches = b.windows(2).filter(|w| class(w[0]) != class(w[1])).count();
    let letters = b.iter().any(|c| c.is_ascii_alphabetic());
    let digits = b.iter().any(|c| c.is_ascii_digit());
    switches >= 4 || (tok.len() >= 20 && letters && digits)
}

/// A command line's shape: argv[0]'s base name and at most 12 argument
/// shapes. For `sh -c CMD` the command string is shaped as a whole.
pub fn argv_shape(argv: &[String]) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(argv.len().min(13));
    if let Some(a0) = argv.first() {
        parts.push(shape(a0.rsplit('/').next().unwrap_or(a0)));
    }
    for a in argv.iter().skip(1).take(12) {
        let a = if a.len() > 512 {
            &a[..a.floor_char_boundary(512)]
        } else {
            a
        };
        parts.push(shape(a));
    }
    parts.join(" ")
}

/// Masks random-looking names under temporary roots (mktemp output such as
/// `/tmp/scn.gFTWzN/` or `/tmp/ccaKNmKY.o`): every alphanumeric run of 6 or
/// more characters becomes `*`.
fn mask_temp_dirs(text: &str) -> Cow<'_, str> {
    let Some(first) = find_temp_root(text) else {
        // Most text names no temporary root: no copy.
        return Cow::Borrowed(text);
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut next = Some(first);
    while let Some((i, root)) = next {
        out.push_str(&rest[..i + root.len()]);
        rest = &rest[i + root.len()..];
        // The path continues until whitespace or a shell metacharacter.
        let end = rest
            .find([' ', '\'', '"', ';', '&', '|', ')', '(', '<', '>', '=', ','])
            .unwrap_or(rest.len());
        out.push_str(&mask_random_runs(&rest[..end]));
        rest = &rest[end..];
        next = find_temp_root(rest);
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The first temporary root in `s` and where it starts: one pass over the
/// slashes (every root starts with one, and no two start alike).
fn find_temp_root(s: &str) -> Option<(usize, &'static str)> {
    s.match_indices('/').find_map(|(i, _)| {
        TEMP_ROOTS
            .iter()
            .find(|r| s[i..].starts_with(**r))
            .map(|r| (i, *r))
    })
}

fn mask_random_runs(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for tok in split_keep(path) {
        let alnum = tok.bytes().all(|b| b.is_ascii_alphanumeric());
        // mktemp names are 6+ random characters; an all-lowercase draw is
        // not rare enough to keep (about 0.5 % per name), so under a
        // temporary root every run that long is masked.
        if alnum && tok.len() >= 6 {
            out.push('*');
        } else {
            out.push_str(tok);
        }
    }
    out
}

/// Splits into alternating runs of word chars (ASCII alphanumerics and
/// `_`) and separators, keeping both. Runs end only next to an ASCII byte,
/// so every piece is whole characters.
fn split_keep(s: &str) -> impl Iterator<Item = &str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = s.as_bytes();
    let mut start = 0;
    std::iter::from_fn(move || {
        let first = *b.get(start)?;
        let w = word(first);
        let end = b[start..]
            .iter()
            .position(|&c| word(c) != w)
            .map_or(b.len(), |n| start + n);
        let tok = &s[start..end];
        start = end;
        Some(tok)
    })
}

fn is_hexish(tok: &str) -> bool {
    tok.len() >= 8
        && tok.bytes().all(|b| b.is_ascii_hexdigit())
        && tok.bytes().any(|b| b.is_ascii_digit())
        && tok.bytes().any(|b| b.is_ascii_alphabetic())
}

fn mask_digits(tok: &str, out: &mut String) {
    let mut in_digits = false;
    for c in tok.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                out.push('N');
            }
            in_digits = true;
        } else {
            out.push(c);
            in_digits = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_temporary_root_is_masked_in_order_and_nothing_else() {
        assert_eq!(
            shape("cp /var/tmp/abcdefg/x /tmp/qwertyu.c /dev/shm/zzzzzzz /run/user/0/sssssss"),
            "cp /var/tmp/*/x /tmp/*.c /dev/shm/* /run/user/N/*"
        );
        // Not a root: another directory, a root without its slash; a root
        // anywhere in a path is one (`/srv/tmp/`).
        assert_eq!(shape("/srv/temp/abcdefg /tmp"), "/srv/temp/abcdefg /tmp");
        assert_eq!(shape("/srv/tmp/abcdefg"), "/srv/tmp/*");
        assert_eq!(find_temp_root("a/b/tmpx/y"), None);
        assert_eq!(
            find_temp_root("x /var/tmp/y /tmp/z"),
            Some((2, "/var/tmp/"))
        );
    }

    #[test]
    fn same_behaviour_same_shape() {
        assert_eq!(
            shape("/tmp/scn.AbCdEf/app"),
            shape("/tmp/scn.XyZ123/app"),
            "random temp dirs are masked"
        );
        assert_eq!(
            argv_shape(&v(&["node", "/tmp/scn.a1B2c3/app.js", "41234"])),
            argv_shape(&v(&["node", "/tmp/scn.Zy9x8W/app.js", "39999"]))
        );
        assert_eq!(shape("commit 3f2a9c1d7e"), "commit H");
    }

    #[test]
    fn different_behaviour_different_shape() {
        let git = argv_shape(&v(&["/bin/sh", "-c", "/usr/bin/git --version"]));
        let curl = argv_shape(&v(&[
            "/bin/sh",
            "-c",
            "curl -s http://127.0.0.1:8080/x -o x",
        ]));
        assert_ne!(git, curl);
        assert_eq!(
            curl,
            argv_shape(&v(&[
                "/bin/sh",
                "-c",
                "curl -s http://127.0.0.1:9090/x -o x"
            ]))
        );
        assert_ne!(shape("/tmp/app"), shape("/tmp/evil"));
        assert_eq!(
            shape("rm -rf /tmp/scn.gFTWzN"),
            shape("rm -rf /tmp/scn.zrEWfa")
        );
        assert_eq!(
            shape("as -o /tmp/ccaKNmKY.o"),
            shape("as -o /tmp/ccNlqUSN.o")
        );
        assert_eq!(
            shape("/tmp/scn.aB3dEf/home/webuser/dashboard/x"),
            "/tmp/scn.*/home/*/*/x"
        );
        assert_eq!(
            shape("/tmp/scn.abcdef/app"),
            shape("/tmp/scn.XyZ123/app"),
            "all-lowercase draws too"
        );
    }

    #[test]
    fn random_names_are_masked_wherever_they_are_and_structure_is_kept() {
        // Compiler temporaries with TMPDIR inside a workspace.
        assert_eq!(
            shape("/home/ci/work/.tmp/ccAbC123.s"),
            shape("/home/ci/work/.tmp/ccx9QpL2.s")
        );
        assert_eq!(
            shape("/home/ci/work/.tmp/ccAbC123.s"),
            "/home/ci/work/.tmp/H.s"
        );
        // mktemp suffixes after a dot, even with few case switches.
        assert_eq!(
            shape("/srv/vs-app.SlfYPMUL/tmp/x.s"),
            shape("/srv/vs-app.Hj0Trgue/tmp/x.s")
        );
        assert_eq!(shape("./conf.gFTWzN/confdefs.h"), "./conf.H/confdefs.h");
        assert_eq!(shape("./conf.pDfl42/confdefs.h"), "./conf.H/confdefs.h");
        for kept in [
            "lib.Config",
            "app.python311",
            "file.tar",
            "a.backup",
            "x.README",
        ] {
            assert!(!shape(kept).contains('H'), "{kept} -> {}", shape(kept));
        }
        // Python tempfile names in an application's own directory.
        assert_eq!(
            shape("/srv/app/uploads/tmpk3j_x9az.json"),
            shape("/srv/app/uploads/tmp0q_7bm2w.json")
        );
        // Request ids, UUIDs and tokens in arguments.
        assert_eq!(
            argv_shape(&v(&[
                "worker",
                "--job",
                "550e8400-e29b-41d4-a716-446655440000"
            ])),
            argv_shape(&v(&[
                "worker",
                "--job",
                "f47ac10b-58cc-4372-a567-0e02b2c3d479"
            ]))
        );
        assert_eq!(
            shape("--token=9fQk2LmZp81xTrBv7WcY"),
            shape("--token=Ab3dE6gH9jK2mN5pQ8sT")
        );
        // Kept: words, versions, camelCase, flags, extensions.
        for kept in [
            "python3.11",
            "x86_64-linux-gnu",
            "MyService",
            "--output-dir=build",
            "Makefile",
            "node_modules/.bin/webpack",
            "libstdc",
        ] {
            assert!(!shape(kept).contains('H'), "{kept} -> {}", shape(kept));
        }
        // Different programs stay different.
        assert_ne!(
            shape("/srv/app/bin/ccAbC123"),
            shape("/srv/app/lib/ccAbC123")
        );
        assert_ne!(shape("/srv/app/a.py"), shape("/srv/app/b.py"));
    }
}
