//! Kernel struct layout from BTF.
//!
//! vigil's eBPF programs are written in Rust, which has no CO-RE relocations:
//! a program cannot ask the loader to patch `task->tgid` to the running
//! kernel's layout. Instead the agent reads the kernel's own type information
//! (`/sys/kernel/btf/vmlinux`) once at start, computes the byte offset of every
//! struct member the programs read, and writes the resulting
//! [`KernelOffsets`] into the programs' read-only data before they are loaded.
//!
//! Lookups walk through anonymous struct/union members transparently (as C
//! does: `qstr.len` is really `qstr.<anon union>.<anon struct>.len`), follow
//! nested named members given as a path (`sock` + `["__sk_common",
//! "skc_num"]`), and look through typedef/const/volatile to find the struct a
//! member is. Members the programs cannot read with a plain
//! `bpf_probe_read_kernel` are refused: bitfields, and members that do not
//! start on a byte boundary. Where the programs assume a member's width, the
//! width is checked too, so a layout change fails loudly at start instead of
//! producing garbage events.

use std::path::{Path, PathBuf};

use btf_rs::{Backend, Btf, Member, Struct, Type};
use vigil_sensor_common::{KernelOffsets, UringOffsets};

/// Where the running kernel exposes its BTF (kernels built with
/// `CONFIG_DEBUG_INFO_BTF=y`, 5.8 and newer).
pub const DEFAULT_BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

/// Longest typedef/const/volatile chain, and deepest nesting of anonymous
/// members, followed before the BTF is declared malformed (guards against
/// reference cycles in corrupt data).
const MAX_TYPE_DEPTH: usize = 32;

/// Why kernel struct offsets could not be obtained from BTF.
///
/// The messages name the struct and member (as a dotted path from the
/// struct) concerned, so a failure on an unusual kernel can be reported and
/// fixed without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// There is no BTF file at the path: the kernel was built without BTF.
    #[error(
        "kernel BTF not found at {}: vigil needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (5.8 or newer)",
        path.display()
    )]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The BTF file exists but could not be read or parsed.
    #[error("cannot load kernel BTF from {}: {source}", path.display())]
    Load {
        /// The BTF file.
        path: PathBuf,
        /// What `btf-rs` reported.
        #[source]
        source: btf_rs::Error,
    },
    /// No struct of that name exists in the BTF.
    #[error("BTF: no struct {struct_name}")]
    NoStruct {
        /// The struct looked for.
        struct_name: String,
    },
    /// The struct exists but has no such member (at some step of the path).
    #[error("BTF: struct {struct_name} has no member {member}")]
    NoMember {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path up to and including the step that was not found.
        member: String,
    },
    /// A path continues below a member that is not a struct or union.
    #[error(
        "BTF: struct {struct_name} member {member} has kind {kind}, not struct or union: \
         cannot look up {next} in it"
    )]
    NotComposite {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path of the member that is not a struct or union.
        member: String,
        /// BTF kind of that member's type (after typedefs and qualifiers).
        kind: &'static str,
        /// The path step that could not be looked up.
        next: String,
    },
    /// The member is a bitfield, which a byte offset cannot address.
    #[error(
        "BTF: struct {struct_name} member {member} is a {bits}-bit bitfield, not a plain member"
    )]
    Bitfield {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path of the member.
        member: String,
        /// Width of the bitfield in bits.
        bits: u32,
    },
    /// The member does not start on a byte boundary.
    #[error(
        "BTF: struct {struct_name} member {member} is at bit offset {bit_offset}, \
         not on a byte boundary"
    )]
    Unaligned {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path of the member.
        member: String,
        /// Bit offset from the start of the outermost struct.
        bit_offset: u64,
    },
    /// The member has a different width than the eBPF programs read.
    #[error(
        "BTF: struct {struct_name} member {member} is {found} bytes, vigil expects {expected}"
    )]
    UnexpectedSize {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path of the member.
        member: String,
        /// Size found in BTF.
        found: usize,
        /// Size the programs assume.
        expected: usize,
    },
    /// The member has a different kind of type than the eBPF programs read
    /// (e.g. a struct where an integer or a pointer is expected).
    #[error(
        "BTF: struct {struct_name} member {member} has kind {found}, vigil expects {expected}"
    )]
    UnexpectedKind {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path of the member.
        member: String,
        /// BTF kind found (after typedefs and qualifiers).
        found: &'static str,
        /// What the programs assume, in words.
        expected: String,
    },
    /// A type or name referenced by the BTF could not be resolved.
    #[error("BTF: cannot resolve {what}: {source}")]
    Resolve {
        /// What was being resolved.
        what: String,
        /// What `btf-rs` reported.
        #[source]
        source: btf_rs::Error,
    },
    /// The BTF data is inconsistent (reference loops, offsets out of range).
    #[error("BTF: struct {struct_name} member {member}: malformed BTF ({reason})")]
    Malformed {
        /// The outermost struct.
        struct_name: String,
        /// Dotted path of the member.
        member: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Loads the running kernel's BTF.
///
/// `path` defaults to [`DEFAULT_BTF_PATH`]; another file can be given for
/// kernels whose BTF is shipped separately (e.g. from BTFHub). A missing file
/// gives [`BtfError::NotFound`], whose message explains the kernel
/// requirement. The path the BTF came from is logged.
///
/// The file is memory-mapped when possible (measured on 6.18: ~3 MB resident
/// and ~50 ms including [`resolve_offsets`], against ~40 MB and ~350 ms when
/// parsed up front); where it cannot be mmap'ed (older kernels' sysfs BTF)
/// it is read and parsed whole instead.
pub fn load_kernel_btf(path: Option<&Path>) -> Result<Btf, BtfError> {
    let path = path.unwrap_or(Path::new(DEFAULT_BTF_PATH));
    let not_found = || BtfError::NotFound {
        path: path.to_path_buf(),
    };
    // `Err` (cannot tell, e.g. permissions): let the open below say why.
    if let Ok(false) = path.try_exists() {
        return Err(not_found());
    }
    let is_not_found = |e: &btf_rs::Error| matches!(e, btf_rs::Error::IO(io) if io.kind() == std::io::ErrorKind::NotFound);
    let (btf, how) = match Btf::from_file_with_backend(path, Backend::Mmap) {
        Ok(btf) => (btf, "mmap"),
        Err(e) if is_not_found(&e) => return Err(not_found()),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot mmap BTF, reading it");
            let btf = Btf::from_file(path).map_err(|source| {
                if is_not_found(&source) {
                    not_found()
                } else {
                    BtfError::Load {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
            (btf, "read")
        }
    };
    tracing::info!(path = %path.display(), access = how, "loaded kernel BTF");
    Ok(btf)
}

/// Returns the byte offset of a member of `struct struct_name`.
///
/// `path` names the member, one step per nesting level of *named* members
/// (`&["__sk_common", "skc_rcv_saddr"]` in `sock`); anonymous struct and union
/// members are walked through transparently at every step, as in C. Each
/// intermediate member must be a struct or union (through typedefs and
/// qualifiers). The member must not be a bitfield and must start on a byte
/// boundary.
///
/// If several structs carry the name (BTF may hold more than one `mount`),
/// the first that has the member is used.
///
/// Bitfields are recognised by their BTF bitfield size, which is how pahole
/// and libbpf encode every struct that has one (`kind_flag` set). The legacy
/// encoding (width inside the int type) is not exposed by `btf-rs`; such a
/// member is still refused unless it starts on a byte boundary, and the width
/// checks of [`resolve_offsets`] catch it there.
// Part of the module's API for ad-hoc lookups (and the tests); the agent
// itself may only need `resolve_offsets`.
#[allow(dead_code)]
pub fn member_offset(btf: &Btf, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
    let found = resolve_struct(
        btf,
        struct_name,
        &[Field {
            path,
            want: Want::Any,
        }],
    )?;
    Ok(found[0])
}

/// Resolves every field of [`KernelOffsets`] from the kernel's BTF and sets
/// `valid` to 1.
///
/// Besides the offsets, the widths the eBPF programs rely on are checked
/// (e.g. `sock.sk_type` must be a 2-byte integer, not a bitfield as on
/// kernels before 5.6), and members the programs dereference must be
/// pointers. The first problem found is returned.
pub fn resolve_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let mut offsets = KernelOffsets::default();
    for (struct_name, fields) in OFFSET_TABLE {
        let reqs: Vec<Field<'_>> = fields
            .iter()
            .map(|f| Field {
                path: f.path,
                want: f.want,
            })
            .collect();
        let found = resolve_struct(btf, struct_name, &reqs)?;
        for (spec, offset) in fields.iter().zip(found) {
            (spec.set)(&mut offsets, offset);
        }
    }
    offsets.valid = 1;
    Ok(offsets)
}

/// Where the io_uring submission program attaches, and what it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringHook {
    /// The raw tracepoint: `io_uring_submit_req` (6.4 and newer) or
    /// `io_uring_submit_sqe` (6.0 to 6.3, the same first argument; before
    /// 6.0 the request came second and had no `cmd`).
    pub tracepoint: &'static str,
    /// The request layout, `valid` set.
    pub offsets: UringOffsets,
}

/// The io_uring submission hook on this kernel: a tracepoint whose first
/// argument is the request (`struct io_kiocb *`), after its arguments were
/// read, and the members of an open request. Optional: the error says what
/// is missing (no io_uring, an older tracepoint, another layout).
pub fn resolve_uring(btf: &Btf) -> Result<UringHook, BtfError> {
    let tracepoint = ["io_uring_submit_req", "io_uring_submit_sqe"]
        .into_iter()
        .find(|tp| first_arg_is(btf, tp, "io_kiocb"))
        .ok_or_else(|| BtfError::NoStruct {
            struct_name: "btf_trace_io_uring_submit_req (a tracepoint taking the request first)"
                .into(),
        })?;
    let req = resolve_struct(
        btf,
        "io_kiocb",
        &[
            Field {
                path: &["opcode"],
                want: Want::Int(1),
            },
            Field {
                path: &["cmd"],
                want: Want::Any,
            },
        ],
    )?;
    let open = resolve_struct(
        btf,
        "io_open",
        &[
            Field {
                path: &["dfd"],
                want: Want::Int(4),
            },
            Field {
                path: &["filename"],
                want: Want::Ptr,
            },
            Field {
                path: &["how", "flags"],
                want: Want::Int(8),
            },
        ],
    )?;
    let name = resolve_struct(
        btf,
        "filename",
        &[Field {
            path: &["name"],
            want: Want::Ptr,
        }],
    )?;
    Ok(UringHook {
        tracepoint,
        offsets: UringOffsets {
            req_opcode: req[0],
            req_cmd: req[1],
            open_dfd: open[0],
            open_filename: open[1],
            open_how_flags: open[2],
            filename_name: name[0],
            valid: 1,
        },
    })
}

/// Whether raw tracepoint `tp`'s first argument (after the probe's data
/// pointer) is a pointer to `struct want`, from its `btf_trace_*` typedef.
fn first_arg_is(btf: &Btf, tp: &str, want: &str) -> bool {
    let ctx = Ctx {
        struct_name: tp,
        member: String::new(),
    };
    let arg = || -> Result<Option<String>, BtfError> {
        let types = btf
            .resolve_types_by_name(&format!("btf_trace_{tp}"))
            .map_err(|e| ctx.resolve(e))?;
        for ty in types {
            let Type::Ptr(p) = strip(btf, ty, &ctx)? else {
                continue;
            };
            let proto = btf.resolve_chained_type(&p).map_err(|e| ctx.resolve(e))?;
            let Type::FuncProto(proto) = strip(btf, proto, &ctx)? else {
                continue;
            };
            let Some(param) = proto.parameters.get(1) else {
                continue;
            };
            let ty = btf
                .resolve_chained_type(param)
                .map_err(|e| ctx.resolve(e))?;
            let Type::Ptr(p) = strip(btf, ty, &ctx)? else {
                continue;
            };
            let pointee = btf.resolve_chained_type(&p).map_err(|e| ctx.resolve(e))?;
            if let Type::Struct(s) = strip(btf, pointee, &ctx)? {
                return Ok(Some(btf.resolve_name(&s).map_err(|e| ctx.resolve(e))?));
            }
        }
        Ok(None)
    };
    matches!(arg(), Ok(Some(name)) if name == want)
}

/// What the eBPF programs assume about a member's type.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Nothing beyond being a plain (non-bitfield, byte-aligned) member.
    Any,
    /// An integer (or enum) of exactly this many bytes.
    Int(usize),
    /// Any type of exactly this many bytes (e.g. `kuid_t`, `atomic_t`).
    Size(usize),
    /// A pointer (the programs read it and follow it).
    Ptr,
}

/// One member looked up in a struct.
struct Field<'a> {
    path: &'a [&'a str],
    want: Want,
}

/// One entry of [`OFFSET_TABLE`]: a member and the [`KernelOffsets`] field
/// that receives its offset.
struct Spec {
    path: &'static [&'static str],
    want: Want,
    set: fn(&mut KernelOffsets, u32),
}

/// Builds a [`Spec`]: `spec!(field, [path...], want)`.
macro_rules! spec {
    ($field:ident, [$($step:literal),+], $want:expr) => {
        Spec {
            path: &[$($step),+],
            want: $want,
            set: |o: &mut KernelOffsets, v: u32| o.$field = v,
        }
    };
}

/// Every [`KernelOffsets`] field, grouped by the struct it is in: members of
/// one group are all taken from the same BTF struct.
const OFFSET_TABLE: &[(&str, &[Spec])] = &[
    (
        "task_struct",
        &[
            spec!(task_pid, ["pid"], Want::Int(4)),
            spec!(task_tgid, ["tgid"], Want::Int(4)),
            spec!(task_real_parent, ["real_parent"], Want::Ptr),
            spec!(task_group_leader, ["group_leader"], Want::Ptr),
            spec!(task_start_boottime, ["start_boottime"], Want::Int(8)),
            spec!(task_mm, ["mm"], Want::Ptr),
            spec!(task_files, ["files"], Want::Ptr),
            spec!(task_fs, ["fs"], Want::Ptr),
            spec!(task_cred, ["cred"], Want::Ptr),
            spec!(task_signal, ["signal"], Want::Ptr),
            spec!(task_exit_code, ["exit_code"], Want::Int(4)),
        ],
    ),
    (
        "signal_struct",
        &[spec!(signal_live, ["live"], Want::Size(4))],
    ),
    (
        "cred",
        &[
            spec!(cred_euid, ["euid"], Want::Size(4)),
            spec!(cred_egid, ["egid"], Want::Size(4)),
        ],
    ),
    (
        "mm_struct",
        &[
            spec!(mm_arg_start, ["arg_start"], Want::Int(8)),
            spec!(mm_arg_end, ["arg_end"], Want::Int(8)),
            spec!(mm_env_start, ["env_start"], Want::Int(8)),
            spec!(mm_env_end, ["env_end"], Want::Int(8)),
        ],
    ),
    (
        "linux_binprm",
        &[
            spec!(binprm_file, ["file"], Want::Ptr),
            spec!(binprm_filename, ["filename"], Want::Ptr),
            spec!(binprm_interp, ["interp"], Want::Ptr),
        ],
    ),
    (
        "file",
        &[
            spec!(file_f_path, ["f_path"], Want::Any),
            spec!(file_f_inode, ["f_inode"], Want::Ptr),
            spec!(file_private_data, ["private_data"], Want::Ptr),
            spec!(file_f_flags, ["f_flags"], Want::Int(4)),
        ],
    ),
    (
        "path",
        &[
            spec!(path_mnt, ["mnt"], Want::Ptr),
            spec!(path_dentry, ["dentry"], Want::Ptr),
        ],
    ),
    (
        "dentry",
        &[
            spec!(dentry_d_parent, ["d_parent"], Want::Ptr),
            spec!(dentry_d_name, ["d_name"], Want::Any),
        ],
    ),
    (
        "qstr",
        &[
            spec!(qstr_len, ["len"], Want::Int(4)),
            spec!(qstr_name, ["name"], Want::Ptr),
        ],
    ),
    (
        "inode",
        &[
            spec!(inode_i_ino, ["i_ino"], Want::Int(8)),
            spec!(inode_i_sb, ["i_sb"], Want::Ptr),
            spec!(inode_i_mode, ["i_mode"], Want::Int(2)),
            spec!(inode_i_nlink, ["__i_nlink"], Want::Int(4)),
            spec!(inode_i_generation, ["i_generation"], Want::Int(4)),
            spec!(inode_i_size, ["i_size"], Want::Int(8)),
        ],
    ),
    ("super_block", &[spec!(sb_s_dev, ["s_dev"], Want::Int(4))]),
    (
        "vfsmount",
        &[spec!(vfsmount_mnt_root, ["mnt_root"], Want::Ptr)],
    ),
    (
        "mount",
        &[
            spec!(mount_mnt, ["mnt"], Want::Any),
            spec!(mount_mnt_parent, ["mnt_parent"], Want::Ptr),
            spec!(mount_mnt_mountpoint, ["mnt_mountpoint"], Want::Ptr),
        ],
    ),
    (
        "fs_struct",
        &[
            spec!(fs_pwd, ["pwd"], Want::Any),
            spec!(fs_root, ["root"], Want::Any),
        ],
    ),
    ("files_struct", &[spec!(files_fdt, ["fdt"], Want::Ptr)]),
    (
        "fdtable",
        &[
            spec!(fdtable_max_fds, ["max_fds"], Want::Int(4)),
            spec!(fdtable_fd, ["fd"], Want::Ptr),
        ],
    ),
    ("socket", &[spec!(socket_sk, ["sk"], Want::Ptr)]),
    (
        "sock",
        &[
            spec!(
                sk_rcv_saddr,
                ["__sk_common", "skc_rcv_saddr"],
                Want::Size(4)
            ),
            spec!(sk_num, ["__sk_common", "skc_num"], Want::Int(2)),
            spec!(
                sk_v6_rcv_saddr,
                ["__sk_common", "skc_v6_rcv_saddr"],
                Want::Size(16)
            ),
            spec!(sk_type, ["sk_type"], Want::Int(2)),
            spec!(sk_protocol, ["sk_protocol"], Want::Int(2)),
            spec!(sk_family, ["__sk_common", "skc_family"], Want::Int(2)),
        ],
    ),
];

/// Looks up all `fields` in the first struct named `struct_name` that has
/// them all, returning their byte offsets in order. When no candidate has
/// them all, the error is the first failure of the candidate that got
/// furthest (on a tie, an unusable member beats a missing one; then the
/// earlier candidate wins).
fn resolve_struct(
    btf: &Btf,
    struct_name: &str,
    fields: &[Field<'_>],
) -> Result<Vec<u32>, BtfError> {
    let candidates = structs_named(btf, struct_name)?;
    let mut best: Option<(usize, BtfError)> = None;
    for candidate in &candidates {
        let mut offsets = Vec::with_capacity(fields.len());
        let mut failure = None;
        for field in fields {
            match resolve_path(btf, candidate, struct_name, field.path, field.want) {
                Ok(offset) => offsets.push(offset),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            None => return Ok(offsets),
            Some(e) => {
                // Finding a member that turns out unusable (a bitfield, the
                // wrong width) counts as getting further than not finding it.
                let score =
                    2 * offsets.len() + usize::from(!matches!(e, BtfError::NoMember { .. }));
                if best.as_ref().is_none_or(|(n, _)| score > *n) {
                    best = Some((score, e));
                }
            }
        }
    }
    Err(best.map(|(_, e)| e).unwrap_or_else(|| BtfError::NoStruct {
        struct_name: struct_name.to_string(),
    }))
}

/// All structs (not unions, typedefs or forward declarations) with the name,
/// in BTF order.
fn structs_named(btf: &Btf, struct_name: &str) -> Result<Vec<Struct>, BtfError> {
    let types = btf
        .resolve_types_by_name(struct_name)
        .map_err(|source| BtfError::Resolve {
            what: format!("struct {struct_name}"),
            source,
        })?;
    let structs: Vec<Struct> = types
        .into_iter()
        .filter_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .collect();
    if structs.is_empty() {
        return Err(BtfError::NoStruct {
            struct_name: struct_name.to_string(),
        });
    }
    Ok(structs)
}

/// Byte offset of `path` in `root` (one candidate struct named
/// `struct_name`), checked against `want`.
fn resolve_path(
    btf: &Btf,
    root: &Struct,
    struct_name: &str,
    path: &[&str],
    want: Want,
) -> Result<u32, BtfError> {
    let ctx = |upto: usize| Ctx {
        struct_name,
        member: path[..upto].join("."),
    };
    if path.is_empty() {
        return Err(BtfError::NoMember {
            struct_name: struct_name.to_string(),
            member: "(empty path)".to_string(),
        });
    }
    let mut current = root.clone();
    let mut bit_offset: u64 = 0;
    let mut member_type = Type::Void;
    for (i, step) in path.iter().enumerate() {
        let here = ctx(i + 1);
        let (member, offset) = find_member(btf, &current, step, bit_offset, 0, &here)?
            .ok_or_else(|| here.no_member())?;
        if let Some(bits) = member.bitfield_size().filter(|&b| b != 0) {
            return Err(BtfError::Bitfield {
                struct_name: here.struct_name.to_string(),
                member: here.member,
                bits,
            });
        }
        bit_offset = offset;
        member_type = member_type_of(btf, &member, &here)?;
        if let Some(next) = path.get(i + 1) {
            current = match &member_type {
                Type::Struct(s) | Type::Union(s) => s.clone(),
                other => {
                    return Err(BtfError::NotComposite {
                        struct_name: here.struct_name.to_string(),
                        member: here.member,
                        kind: other.name(),
                        next: next.to_string(),
                    })
                }
            };
        }
    }
    let here = ctx(path.len());
    if !bit_offset.is_multiple_of(8) {
        return Err(BtfError::Unaligned {
            struct_name: struct_name.to_string(),
            member: here.member,
            bit_offset,
        });
    }
    check_type(btf, &member_type, want, &here)?;
    u32::try_from(bit_offset / 8).map_err(|_| here.malformed("member offset beyond 4 GiB"))
}

/// Finds the member called `name` in `s`, looking into anonymous struct and
/// union members too. Returns it with its bit offset from the outermost
/// struct (`base` is the bit offset of `s` itself).
fn find_member(
    btf: &Btf,
    s: &Struct,
    name: &str,
    base: u64,
    depth: usize,
    ctx: &Ctx<'_>,
) -> Result<Option<(Member, u64)>, BtfError> {
    if depth > MAX_TYPE_DEPTH {
        return Err(ctx.malformed("anonymous members nested too deeply"));
    }
    for member in &s.members {
        let offset = base + u64::from(member.bit_offset());
        let member_name = btf.resolve_name(member).map_err(|e| ctx.resolve(e))?;
        if member_name == name {
            return Ok(Some((member.clone(), offset)));
        }
        if member_name.is_empty() {
            if let Type::Struct(inner) | Type::Union(inner) = member_type_of(btf, member, ctx)? {
                if let Some(found) = find_member(btf, &inner, name, offset, depth + 1, ctx)? {
                    return Ok(Some(found));
                }
            }
        }
    }
    Ok(None)
}

/// The type of a member, with typedefs, qualifiers and type tags stripped.
fn member_type_of(btf: &Btf, member: &Member, ctx: &Ctx<'_>) -> Result<Type, BtfError> {
    let ty = btf
        .resolve_chained_type(member)
        .map_err(|e| ctx.resolve(e))?;
    strip(btf, ty, ctx)
}

/// Follows typedef, const, volatile, restrict and type-tag links down to the
/// underlying type.
fn strip(btf: &Btf, mut ty: Type, ctx: &Ctx<'_>) -> Result<Type, BtfError> {
    for _ in 0..MAX_TYPE_DEPTH {
        let next = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t),
            Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => btf.resolve_chained_type(t),
            Type::TypeTag(t) => btf.resolve_chained_type(t),
            _ => return Ok(ty),
        };
        ty = next.map_err(|e| ctx.resolve(e))?;
    }
    Err(ctx.malformed("typedef/qualifier chain too long"))
}

/// Size in bytes of a stripped type, when it has one.
fn type_size(btf: &Btf, ty: &Type, ctx: &Ctx<'_>) -> Result<Option<usize>, BtfError> {
    Ok(match ty {
        Type::Int(t) => Some(t.size()),
        Type::Enum(t) => Some(t.size()),
        Type::Enum64(t) => Some(t.size()),
        Type::Float(t) => Some(t.size()),
        Type::Struct(t) | Type::Union(t) => Some(t.size()),
        // BTF does not record pointer width; the agent runs on the kernel's
        // own architecture, so it is the agent's.
        Type::Ptr(_) => Some(std::mem::size_of::<usize>()),
        Type::Array(a) => {
            let elem = btf.resolve_chained_type(a).map_err(|e| ctx.resolve(e))?;
            let elem = strip(btf, elem, ctx)?;
            type_size(btf, &elem, ctx)?.and_then(|n| n.checked_mul(a.len()))
        }
        _ => None,
    })
}

/// Checks a member's stripped type against what the programs assume.
fn check_type(btf: &Btf, ty: &Type, want: Want, ctx: &Ctx<'_>) -> Result<(), BtfError> {
    let (is_kind, size, expected) = match want {
        Want::Any => return Ok(()),
        Want::Ptr => (matches!(ty, Type::Ptr(_)), None, "a pointer".to_string()),
        Want::Int(n) => (
            matches!(ty, Type::Int(_) | Type::Enum(_) | Type::Enum64(_)),
            Some(n),
            format!("an integer of {n} bytes"),
        ),
        Want::Size(n) => (true, Some(n), format!("{n} bytes")),
    };
    let found_size = type_size(btf, ty, ctx)?;
    if !is_kind || (size.is_some() && found_size.is_none()) {
        return Err(BtfError::UnexpectedKind {
            struct_name: ctx.struct_name.to_string(),
            member: ctx.member.clone(),
            found: ty.name(),
            expected,
        });
    }
    if let (Some(expected), Some(found)) = (size, found_size) {
        if expected != found {
            return Err(BtfError::UnexpectedSize {
                struct_name: ctx.struct_name.to_string(),
                member: ctx.member.clone(),
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// The member being resolved, for error messages.
struct Ctx<'a> {
    struct_name: &'a str,
    member: String,
}

impl Ctx<'_> {
    fn no_member(&self) -> BtfError {
        BtfError::NoMember {
            struct_name: self.struct_name.to_string(),
            member: self.member.clone(),
        }
    }

    fn resolve(&self, source: btf_rs::Error) -> BtfError {
        BtfError::Resolve {
            what: format!("struct {} member {}", self.struct_name, self.member),
            source,
        }
    }

    fn malformed(&self, reason: &'static str) -> BtfError {
        BtfError::Malformed {
            struct_name: self.struct_name.to_string(),
            member: self.member.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// The running kernel's BTF, parsed once for all tests.
    fn kernel_btf() -> &'static Btf {
        static BTF: OnceLock<Btf> = OnceLock::new();
        BTF.get_or_init(|| load_kernel_btf(None).expect("kernel BTF"))
    }

    /// All fields of `o` in declaration order. The destructuring has no
    /// `..`, so adding a field to `KernelOffsets` breaks this test until the
    /// new field is handled here (and, through `table_sets_every_field`, in
    /// `OFFSET_TABLE`).
    fn fields(o: &KernelOffsets) -> Vec<(&'static str, u32)> {
        let KernelOffsets {
            task_pid,
            task_tgid,
            task_real_parent,
            task_group_leader,
            task_start_boottime,
            task_mm,
            task_files,
            task_fs,
            task_cred,
            task_signal,
            task_exit_code,
            signal_live,
            cred_euid,
            cred_egid,
            mm_arg_start,
            mm_arg_end,
            mm_env_start,
            mm_env_end,
            binprm_file,
            binprm_filename,
            binprm_interp,
            file_f_path,
            file_f_inode,
            file_private_data,
            file_f_flags,
            path_mnt,
            path_dentry,
            dentry_d_parent,
            dentry_d_name,
            qstr_len,
            qstr_name,
            inode_i_ino,
            inode_i_sb,
            inode_i_mode,
            inode_i_nlink,
            inode_i_generation,
            inode_i_size,
            sb_s_dev,
            vfsmount_mnt_root,
            mount_mnt,
            mount_mnt_parent,
            mount_mnt_mountpoint,
            fs_pwd,
            fs_root,
            files_fdt,
            fdtable_max_fds,
            fdtable_fd,
            socket_sk,
            sk_rcv_saddr,
            sk_num,
            sk_v6_rcv_saddr,
            sk_type,
            sk_protocol,
            sk_family,
            valid,
        } = *o;
        vec![
            ("task_pid", task_pid),
            ("task_tgid", task_tgid),
            ("task_real_parent", task_real_parent),
            ("task_group_leader", task_group_leader),
            ("task_start_boottime", task_start_boottime),
            ("task_mm", task_mm),
            ("task_files", task_files),
            ("task_fs", task_fs),
            ("task_cred", task_cred),
            ("task_signal", task_signal),
            ("task_exit_code", task_exit_code),
            ("signal_live", signal_live),
            ("cred_euid", cred_euid),
            ("cred_egid", cred_egid),
            ("mm_arg_start", mm_arg_start),
            ("mm_arg_end", mm_arg_end),
            ("mm_env_start", mm_env_start),
            ("mm_env_end", mm_env_end),
            ("binprm_file", binprm_file),
            ("binprm_filename", binprm_filename),
            ("binprm_interp", binprm_interp),
            ("file_f_path", file_f_path),
            ("file_f_inode", file_f_inode),
            ("file_private_data", file_private_data),
            ("file_f_flags", file_f_flags),
            ("path_mnt", path_mnt),
            ("path_dentry", path_dentry),
            ("dentry_d_parent", dentry_d_parent),
            ("dentry_d_name", dentry_d_name),
            ("qstr_len", qstr_len),
            ("qstr_name", qstr_name),
            ("inode_i_ino", inode_i_ino),
            ("inode_i_sb", inode_i_sb),
            ("inode_i_mode", inode_i_mode),
            ("inode_i_nlink", inode_i_nlink),
            ("inode_i_generation", inode_i_generation),
            ("inode_i_size", inode_i_size),
            ("sb_s_dev", sb_s_dev),
            ("vfsmount_mnt_root", vfsmount_mnt_root),
            ("mount_mnt", mount_mnt),
            ("mount_mnt_parent", mount_mnt_parent),
            ("mount_mnt_mountpoint", mount_mnt_mountpoint),
            ("fs_pwd", fs_pwd),
            ("fs_root", fs_root),
            ("files_fdt", files_fdt),
            ("fdtable_max_fds", fdtable_max_fds),
            ("fdtable_fd", fdtable_fd),
            ("socket_sk", socket_sk),
            ("sk_rcv_saddr", sk_rcv_saddr),
            ("sk_num", sk_num),
            ("sk_v6_rcv_saddr", sk_v6_rcv_saddr),
            ("sk_type", sk_type),
            ("sk_protocol", sk_protocol),
            ("sk_family", sk_family),
            ("valid", valid),
        ]
    }

    #[test]
    fn table_sets_every_field() {
        let mut o = KernelOffsets::default();
        let mut n = 0;
        for (_, specs) in OFFSET_TABLE {
            for spec in *specs {
                n += 1;
                (spec.set)(&mut o, n);
            }
        }
        let all = fields(&o);
        assert_eq!(n as usize, all.len() - 1, "one table entry per field");
        let mut seen: Vec<u32> = all
            .iter()
            .filter(|(name, _)| *name != "valid")
            .map(|&(name, v)| {
                assert_ne!(v, 0, "{name} not set by OFFSET_TABLE");
                v
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            n as usize,
            "two table entries set the same field"
        );
    }

    #[test]
    fn resolves_running_kernel() {
        let o = resolve_offsets(kernel_btf()).expect("resolve_offsets");
        for (name, v) in fields(&o) {
            println!("{name:<22} {v}");
        }
        assert_eq!(o.valid, 1);
        assert!(o.task_tgid > o.task_pid);
        assert_eq!(o.path_mnt, 0);
        assert_eq!(o.path_dentry, 8);
        assert_eq!(o.qstr_name, 8);
        // `len` is the second u32 of the anonymous `hash_len` union.
        assert_eq!(o.qstr_len, 4);
        // `__sk_common` is the first member of `sock`.
        assert!(o.sk_rcv_saddr < o.sk_num && o.sk_num < o.sk_v6_rcv_saddr);
        assert_ne!(o.sk_type, o.sk_protocol);
        assert!(o.mm_arg_end > o.mm_arg_start);
        assert!(o.cred_egid > o.cred_euid);
    }

    #[test]
    fn resolves_the_io_uring_hook_of_the_running_kernel() {
        let events = [
            "/sys/kernel/tracing/events/io_uring",
            "/sys/kernel/debug/tracing/events/io_uring",
        ]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
        let Some(events) = events else {
            eprintln!("skipped: no io_uring tracepoints on this kernel");
            return;
        };
        let hook = resolve_uring(kernel_btf()).expect("resolve_uring");
        // The tracepoint chosen is one this kernel has.
        assert!(events.join(hook.tracepoint).exists(), "{hook:?}");
        let o = hook.offsets;
        assert_eq!(o.valid, 1);
        // The opcode follows the per-opcode union; `io_open` starts with
        // its file, then dfd, then the name.
        assert!(o.req_opcode > o.req_cmd, "{o:?}");
        assert!(o.open_dfd > 0 && o.open_filename > o.open_dfd, "{o:?}");
        assert!(o.open_how_flags > o.open_filename, "{o:?}");
        assert!(!first_arg_is(
            kernel_btf(),
            "sched_process_exec",
            "io_kiocb"
        ));
        assert!(first_arg_is(
            kernel_btf(),
            "sched_process_exec",
            "task_struct"
        ));
    }

    #[test]
    fn both_btf_backends_agree() {
        // `load_kernel_btf` mmaps; the fallback parses the file up front.
        let parsed = Btf::from_file(DEFAULT_BTF_PATH).expect("kernel BTF");
        assert_eq!(
            resolve_offsets(&parsed).unwrap(),
            resolve_offsets(kernel_btf()).unwrap()
        );
    }

    #[test]
    fn walks_anonymous_and_nested_members() {
        let btf = kernel_btf();
        assert_eq!(member_offset(btf, "qstr", &["len"]).unwrap(), 4);
        assert_eq!(member_offset(btf, "qstr", &["hash"]).unwrap(), 0);
        assert_eq!(member_offset(btf, "qstr", &["hash_len"]).unwrap(), 0);
        // Nested path and the same member reached through `sock_common`.
        let in_sock = member_offset(btf, "sock", &["__sk_common", "skc_num"]).unwrap();
        let common = member_offset(btf, "sock", &["__sk_common"]).unwrap();
        let in_common = member_offset(btf, "sock_common", &["skc_num"]).unwrap();
        assert_eq!(in_sock, common + in_common);
        // Typedef'd struct member: `path.mnt` through `file.f_path`.
        let f_path = member_offset(btf, "file", &["f_path"]).unwrap();
        assert_eq!(
            member_offset(btf, "file", &["f_path", "dentry"]).unwrap(),
            f_path + 8
        );
    }

    #[test]
    fn missing_member_is_named() {
        let btf = kernel_btf();
        let err = member_offset(btf, "task_struct", &["no_such_member"]).unwrap_err();
        assert!(matches!(err, BtfError::NoMember { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "BTF: struct task_struct has no member no_such_member"
        );
        let err = member_offset(btf, "sock", &["__sk_common", "skc_nope"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: struct sock has no member __sk_common.skc_nope"
        );
        let err = member_offset(btf, "no_such_struct_vigil", &["x"]).unwrap_err();
        assert_eq!(err.to_string(), "BTF: no struct no_such_struct_vigil");
    }

    #[test]
    fn descending_into_a_scalar_is_refused() {
        let err = member_offset(kernel_btf(), "task_struct", &["pid", "x"]).unwrap_err();
        assert!(matches!(err, BtfError::NotComposite { .. }), "{err:?}");
        assert!(err.to_string().contains("member pid has kind int"), "{err}");
    }

    #[test]
    fn bitfield_is_refused() {
        // `sched_reset_on_fork:1` has been a bitfield of task_struct for
        // many releases.
        let err = member_offset(kernel_btf(), "task_struct", &["sched_reset_on_fork"]).unwrap_err();
        assert!(matches!(err, BtfError::Bitfield { bits: 1, .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "BTF: struct task_struct member sched_reset_on_fork is a 1-bit bitfield, not a plain member"
        );
    }

    #[test]
    fn size_checks_name_the_member() {
        let btf = kernel_btf();
        let candidates = structs_named(btf, "inode").unwrap();
        let err =
            resolve_path(btf, &candidates[0], "inode", &["i_mode"], Want::Int(4)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: struct inode member i_mode is 2 bytes, vigil expects 4"
        );
        let err = resolve_path(btf, &candidates[0], "inode", &["i_sb"], Want::Int(8)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "BTF: struct inode member i_sb has kind ptr, vigil expects an integer of 8 bytes"
        );
    }

    /// A tiny hand-built BTF blob (little endian):
    ///
    /// ```text
    /// [1] int                       4 bytes
    /// [2] struct mount { int a; }   -- a first `mount` without `b`
    /// [3] struct mount {            -- kind_flag set (has bitfields)
    ///         int a;                   bit   0
    ///         int b;                   bit  32
    ///         int bf:3;                bit  64
    ///         int u;                   bit  68 (not byte aligned)
    ///         union { int x; };        bit  96
    ///     }
    /// [4] union { int x; }
    /// [5] typedef struct mount mount_t
    /// [6] struct outer { mount_t m; int *p; }
    /// [7] int *
    /// ```
    fn synthetic_btf() -> Btf {
        const INT: u32 = 1;
        const PTR: u32 = 2;
        const STRUCT: u32 = 4;
        const UNION: u32 = 5;
        const TYPEDEF: u32 = 8;
        let strings = b"\0int\0mount\0a\0b\0bf\0u\0x\0mount_t\0outer\0m\0p\0";
        let name = |n: &str| -> u32 {
            let needle = format!("\0{n}\0");
            let pos = strings
                .windows(needle.len())
                .position(|w| w == needle.as_bytes())
                .expect("name in string table");
            pos as u32 + 1
        };
        let info =
            |kind: u32, vlen: u32, kflag: bool| (u32::from(kflag) << 31) | (kind << 24) | vlen;
        let mut types: Vec<u32> = Vec::new();
        // [1] int: size 4, signed, 32 bits.
        types.extend([name("int"), info(INT, 0, false), 4, (1 << 24) | 32]);
        // [2] struct mount { int a; }
        types.extend([name("mount"), info(STRUCT, 1, false), 4]);
        types.extend([name("a"), 1, 0]);
        // [3] struct mount with kind_flag: offset = bitfield_size << 24 | bit_offset.
        types.extend([name("mount"), info(STRUCT, 5, true), 16]);
        types.extend([name("a"), 1, 0]);
        types.extend([name("b"), 1, 32]);
        types.extend([name("bf"), 1, (3 << 24) | 64]);
        types.extend([name("u"), 1, 68]);
        types.extend([0, 4, 96]);
        // [4] union { int x; }
        types.extend([0, info(UNION, 1, false), 4]);
        types.extend([name("x"), 1, 0]);
        // [5] typedef struct mount mount_t
        types.extend([name("mount_t"), info(TYPEDEF, 0, false), 3]);
        // [6] struct outer { mount_t m; int *p; }
        types.extend([name("outer"), info(STRUCT, 2, false), 24]);
        types.extend([name("m"), 5, 0]);
        types.extend([name("p"), 7, 128]);
        // [7] int *
        types.extend([0, info(PTR, 0, false), 1]);

        let type_len = (types.len() * 4) as u32;
        let mut blob = Vec::new();
        blob.extend(0xeb9f_u16.to_le_bytes());
        blob.extend([1u8, 0u8]); // version, flags
        for v in [24, 0, type_len, type_len, strings.len() as u32] {
            blob.extend(u32::to_le_bytes(v));
        }
        for v in types {
            blob.extend(v.to_le_bytes());
        }
        blob.extend(strings);
        Btf::from_bytes(&blob).expect("synthetic BTF parses")
    }

    #[test]
    fn duplicate_structs_pick_the_one_with_the_members() {
        let btf = synthetic_btf();
        assert_eq!(member_offset(&btf, "mount", &["a"]).unwrap(), 0);
        // Only the second `mount` has `b`.
        assert_eq!(member_offset(&btf, "mount", &["b"]).unwrap(), 4);
        let both = [
            Field {
                path: &["a"],
                want: Want::Int(4),
            },
            Field {
                path: &["b"],
                want: Want::Int(4),
            },
        ];
        assert_eq!(resolve_struct(&btf, "mount", &both).unwrap(), vec![0, 4]);
        // The error comes from the candidate that got furthest: the second
        // `mount` has `a` and `b` but not `c`; the first lacks `b`.
        let three = [
            Field {
                path: &["a"],
                want: Want::Any,
            },
            Field {
                path: &["b"],
                want: Want::Any,
            },
            Field {
                path: &["c"],
                want: Want::Any,
            },
        ];
        assert_eq!(
            resolve_struct(&btf, "mount", &three)
                .unwrap_err()
                .to_string(),
            "BTF: struct mount has no member c"
        );
    }

    #[test]
    fn synthetic_anonymous_typedef_bitfield_unaligned() {
        let btf = synthetic_btf();
        // Through the anonymous union at bit 96.
        assert_eq!(member_offset(&btf, "mount", &["x"]).unwrap(), 12);
        // Through a typedef'd struct member, then an anonymous union.
        assert_eq!(member_offset(&btf, "outer", &["m", "x"]).unwrap(), 12);
        assert_eq!(member_offset(&btf, "outer", &["p"]).unwrap(), 16);
        let err = member_offset(&btf, "mount", &["bf"]).unwrap_err();
        assert!(matches!(err, BtfError::Bitfield { bits: 3, .. }), "{err:?}");
        let err = member_offset(&btf, "mount", &["u"]).unwrap_err();
        assert!(
            matches!(err, BtfError::Unaligned { bit_offset: 68, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "BTF: struct mount member u is at bit offset 68, not on a byte boundary"
        );
        let err = member_offset(&btf, "outer", &["m", "nope"]).unwrap_err();
        assert_eq!(err.to_string(), "BTF: struct outer has no member m.nope");
    }

    #[test]
    fn missing_btf_file_explains_requirement() {
        let Err(err) = load_kernel_btf(Some(Path::new("/nonexistent/vmlinux"))) else {
            panic!("loading a missing file succeeded");
        };
        assert_eq!(
            err.to_string(),
            "kernel BTF not found at /nonexistent/vmlinux: vigil needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (5.8 or newer)"
        );
    }
}
