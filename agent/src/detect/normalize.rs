//! Shapes: the parts of a path or command line that stay the same between
//! two runs of the same behaviour. Numbers (pids, ports), hex ids and the
//! random names of temporary directories are masked, so a baseline learned
//! once still matches tomorrow, while a different command is a different
//! shape.

/// Temporary roots whose first component is random (mktemp).
const TEMP_ROOTS: &[&str] = &["/tmp/", "/var/tmp/", "/dev/shm/", "/run/user/"];

/// Masks digit runs as `N`, hex-looking tokens (>= 8 hex chars with a digit)
/// as `H`, and random-looking names under temporary roots as `*`.
pub fn shape(text: &str) -> String {
    let masked_tmp = mask_temp_dirs(text);
    let mut out = String::with_capacity(masked_tmp.len());
    for tok in split_keep(&masked_tmp) {
        if is_hexish(tok) {
            out.push('H');
        } else {
            mask_digits(tok, &mut out);
        }
    }
    out
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
fn mask_temp_dirs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((i, root)) = TEMP_ROOTS
        .iter()
        .filter_map(|r| rest.find(r).map(|i| (i, *r)))
        .min_by_key(|(i, _)| *i)
    {
        out.push_str(&rest[..i + root.len()]);
        rest = &rest[i + root.len()..];
        // The path continues until whitespace or a shell metacharacter.
        let end = rest
            .find([' ', '\'', '"', ';', '&', '|', ')', '(', '<', '>', '=', ','])
            .unwrap_or(rest.len());
        out.push_str(&mask_random_runs(&rest[..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
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

/// Splits into alternating runs of word chars and separators, keeping both.
fn split_keep(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev_word: Option<bool> = None;
    for (i, c) in s.char_indices() {
        let w = c.is_ascii_alphanumeric() || c == '_';
        if let Some(p) = prev_word {
            if p != w {
                out.push(&s[start..i]);
                start = i;
            }
        }
        prev_word = Some(w);
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
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
}
