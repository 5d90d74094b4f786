//! The driver's sandbox, entered after everything is open and before any request is served:
//! an unprivileged identity, no_new_privs, and a seccomp filter that allows only the system
//! calls serving needs. From then on the driver cannot open a file, make or bind a socket,
//! execute a program or trace another process: all it can touch is what its supervisor
//! handed over (the image, the root device, the listening socket, the heartbeat pipe).

use std::collections::BTreeMap;

use nix::unistd::{Gid, Group, Uid, User};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Why the sandbox cannot be set up (the driver then does not serve).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("looking up {what} {name:?}")]
    Lookup {
        what: &'static str,
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("no {what} {name:?}")]
    Unknown { what: &'static str, name: String },
    #[error("the driver must not run as uid 0; configure an unprivileged user")]
    Root,
    #[error("{step}")]
    Drop {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("could regain root after dropping it")]
    Regained,
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// Who the driver becomes when started as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `user` and `group` (names or numeric ids) while /etc/passwd can still be read.
pub fn resolve(user: &str, group: &str) -> Result<Identity, SandboxError> {
    let lookup = |what, name: &str| {
        let name = name.to_owned();
        move |source| SandboxError::Lookup { what, name, source }
    };
    let unknown = |what, name: &str| SandboxError::Unknown { what, name: name.to_owned() };
    let uid = match user.parse::<u32>() {
        Ok(id) => id,
        Err(_) => {
            User::from_name(user).map_err(lookup("user", user))?.ok_or_else(|| unknown("user", user))?.uid.as_raw()
        }
    };
    let gid = match group.parse::<u32>() {
        Ok(id) => id,
        Err(_) => Group::from_name(group)
            .map_err(lookup("group", group))?
            .ok_or_else(|| unknown("group", group))?
            .gid
            .as_raw(),
    };
    if uid == 0 {
        return Err(SandboxError::Root);
    }
    Ok(Identity { uid, gid })
}

/// What `enter` did, for the log.
#[derive(Debug, Clone, Copy)]
pub struct Sandboxed {
    pub uid: u32,
    pub gid: u32,
    pub dropped_root: bool,
}

/// Drops root (if running as root) to `identity` with no supplementary groups, sets
/// no_new_privs, and installs the seccomp filter on every thread. Call it before starting any
/// thread that must be covered (threads started later inherit the filter).
pub fn enter(identity: Identity) -> Result<Sandboxed, SandboxError> {
    let step = |step: String| move |source| SandboxError::Drop { step, source };
    let dropped_root = Uid::effective().is_root();
    if dropped_root {
        let (uid, gid) = (Uid::from_raw(identity.uid), Gid::from_raw(identity.gid));
        nix::unistd::setgroups(&[]).map_err(step("setgroups".into()))?;
        nix::unistd::setresgid(gid, gid, gid).map_err(step(format!("setresgid {gid}")))?;
        nix::unistd::setresuid(uid, uid, uid).map_err(step(format!("setresuid {uid}")))?;
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(SandboxError::Regained);
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(step("no_new_privs".into()))?;
    let program = filter()?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    Ok(Sandboxed { uid: Uid::current().as_raw(), gid: Gid::current().as_raw(), dropped_root })
}

/// The system calls a running driver makes: I/O on descriptors it holds, threads, memory,
/// time, signals, accepting connections. Everything else fails with EPERM (not a kill, so a
/// forgotten call shows up as a clear error and a restart, not a mystery).
fn allowed() -> Vec<i64> {
    vec![
        // I/O on held descriptors (the image, the sockets, the heartbeat pipe, stderr)
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_preadv,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        // batched writes on the image's ring (set up before the sandbox, restricted to writes)
        libc::SYS_io_uring_enter,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_sync_file_range,
        libc::SYS_fsync,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_fcntl,
        // Only calls that exist on x86_64 and aarch64 alike (aarch64 has no poll; glibc's
        // fstat is newfstatat and std's metadata is statx): the driver polls with ppoll, and a
        // test traces it to check that it makes neither poll nor fstat.
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_ioctl,
        libc::SYS_ppoll,
        // sessions on the inherited listening socket (no socket, bind or connect)
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        // a TLS connection's pump talks to the connection through a socket pair
        libc::SYS_socketpair,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        // vhost-user: the inflight region the driver gives a front-end is a memfd of the size
        // it asks for (guest memory and eventfds arrive as descriptors; mmap, read, write)
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        // threads and memory
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_prctl,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // time and signals (SIGTERM is taken by sigwait)
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_tgkill,
        // the kernel resumes a sleep or wait interrupted by SIGSTOP/SIGCONT (a debugger, the
        // cgroup freezer) with restart_syscall: denied, std's sleep panics on its EPERM
        libc::SYS_restart_syscall,
    ]
}

fn filter() -> Result<BpfProgram, SandboxError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed().into_iter().map(|nr| (nr, vec![])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SandboxError::Seccomp(format!("arch: {e}")))?;
    let filter = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)
        .map_err(|e| SandboxError::Seccomp(format!("filter: {e}")))?;
    BpfProgram::try_from(filter).map_err(|e| SandboxError::Seccomp(format!("compile: {e}")))
}
