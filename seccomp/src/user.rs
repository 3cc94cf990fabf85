//! Giving up root once setup is done (the daemons' `--user`), as QEMU's
//! `-run-with user=` and Firecracker's jailer do: the process opens what
//! only root may open (images, /dev/net/tun) and binds its sockets, then
//! becomes an ordinary user for the rest of its life, so that a guest or
//! client that takes it over holds that user's rights, not root's.
//!
//! The switch is for good: user and group ids (real, effective, saved)
//! and the supplementary groups all change, root's capabilities go with
//! them (the kernel clears them when no id is 0 any more), and the
//! process checks that it cannot become root again.

use std::ffi::{CStr, CString};
use std::io;
use std::str::FromStr;

/// A user to become, parsed from `USER[:GROUP]` (names or numeric ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The account's name, for its supplementary groups; `None` for a
    /// numeric id without an account (then it gets no supplementary group).
    name: Option<CString>,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("no user named {0:?}")]
    NoUser(String),
    #[error("no group named {0:?}")]
    NoGroup(String),
    #[error("user id {0} has no account to take a group from: give one as {0}:GROUP")]
    NoPrimaryGroup(libc::uid_t),
    #[error("cannot look up {0:?}: {1}")]
    Lookup(String, io::Error),
    #[error("cannot become user {uid} (group {gid}): {step}: {err}")]
    Switch {
        uid: libc::uid_t,
        gid: libc::gid_t,
        step: &'static str,
        err: io::Error,
    },
    #[error("became user {0} but could still become root again")]
    CouldRegainRoot(libc::uid_t),
    #[error("{0}: an id of -1 means \"no change\" to the kernel, not a user")]
    NoChange(String),
    #[error(
        "{0} is root: the daemon would keep every privilege (leave --user out to run as root)"
    )]
    Root(String),
}

impl FromStr for RunAs {
    type Err = UserError;

    fn from_str(s: &str) -> Result<RunAs, UserError> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        for part in [Some(user), group].into_iter().flatten() {
            if part.parse::<u32>() == Ok(u32::MAX) {
                return Err(UserError::NoChange(part.to_string()));
            }
        }
        let account = match user.parse::<libc::uid_t>() {
            Ok(uid) => passwd(Key::Uid(uid), user)?.or(Some(Account {
                name: None,
                uid,
                gid: None,
            })),
            Err(_) => passwd(Key::Name(user), user)?,
        }
        .ok_or_else(|| UserError::NoUser(user.to_string()))?;
        let gid = match group {
            Some(g) => match g.parse::<libc::gid_t>() {
                Ok(gid) => gid,
                Err(_) => group_id(g)?.ok_or_else(|| UserError::NoGroup(g.to_string()))?,
            },
            None => account.gid.ok_or(UserError::NoPrimaryGroup(account.uid))?,
        };
        if account.uid == 0 {
            return Err(UserError::Root(user.to_string()));
        }
        Ok(RunAs {
            name: account.name,
            uid: account.uid,
            gid,
        })
    }
}

impl RunAs {
    /// Becomes this user for good: supplementary groups, then the group,
    /// then the user (the order in which each step is still allowed).
    /// glibc applies each change to every thread of the process. No
    /// program it may run later gains privileges either (no_new_privs,
    /// which the seccomp filter sets too, but `--seccomp off` installs
    /// none).
    pub fn assume(&self) -> Result<(), UserError> {
        let (uid, gid) = (self.uid, self.gid);
        let fail = |step, err| UserError::Switch {
            uid,
            gid,
            step,
            err,
        };
        let ok = |r: libc::c_int| {
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: the calls take plain ids, a NUL-terminated name that
        // outlives the call, or a one-element array that does.
        unsafe {
            match &self.name {
                Some(n) => ok(libc::initgroups(n.as_ptr(), gid)),
                None => ok(libc::setgroups(1, &gid)),
            }
            .map_err(|e| fail("setgroups", e))?;
            ok(libc::setresgid(gid, gid, gid)).map_err(|e| fail("setresgid", e))?;
            ok(libc::setresuid(uid, uid, uid)).map_err(|e| fail("setresuid", e))?;
            if libc::setuid(0) == 0 {
                return Err(UserError::CouldRegainRoot(uid));
            }
            ok(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
                .map_err(|e| fail("no_new_privs", e))?;
        }
        Ok(())
    }
}

struct Account {
    name: Option<CString>,
    uid: libc::uid_t,
    gid: Option<libc::gid_t>,
}

enum Key<'a> {
    Name(&'a str),
    Uid(libc::uid_t),
}

/// The passwd entry for `key` (`shown` names it in errors), or `None`.
fn passwd(key: Key<'_>, shown: &str) -> Result<Option<Account>, UserError> {
    let name = match key {
        Key::Name(n) => Some(CString::new(n).map_err(|_| UserError::NoUser(shown.into()))?),
        Key::Uid(_) => None,
    };
    lookup(shown, |buf| {
        // SAFETY: an all-zero passwd is a valid value for the call to
        // fill; the buffer and its length describe live memory, and the
        // strings the entry points to live in that buffer, read before it
        // is dropped.
        unsafe {
            let mut pw: libc::passwd = std::mem::zeroed();
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let (p, l) = (buf.as_mut_ptr().cast(), buf.len());
            let r = match (&name, &key) {
                (Some(n), _) => libc::getpwnam_r(n.as_ptr(), &mut pw, p, l, &mut found),
                (None, Key::Uid(uid)) => libc::getpwuid_r(*uid, &mut pw, p, l, &mut found),
                (None, Key::Name(_)) => unreachable!("a name lookup has its C string"),
            };
            (
                r,
                (!found.is_null()).then(|| Account {
                    name: Some(CStr::from_ptr(pw.pw_name).to_owned()),
                    uid: pw.pw_uid,
                    gid: Some(pw.pw_gid),
                }),
            )
        }
    })
}

/// The id of the group named `name`, or `None`.
fn group_id(name: &str) -> Result<Option<libc::gid_t>, UserError> {
    let c = CString::new(name).map_err(|_| UserError::NoGroup(name.into()))?;
    lookup(name, |buf| {
        // SAFETY: as in `passwd`, for a group entry.
        unsafe {
            let mut gr: libc::group = std::mem::zeroed();
            let mut found: *mut libc::group = std::ptr::null_mut();
            let r = libc::getgrnam_r(
                c.as_ptr(),
                &mut gr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            );
            (r, (!found.is_null()).then_some(gr.gr_gid))
        }
    })
}

/// Runs a `get*_r` lookup with a buffer that grows while the call says
/// ERANGE (up to 1 MiB: a bigger entry is a broken database).
fn lookup<T>(
    shown: &str,
    mut call: impl FnMut(&mut [u8]) -> (libc::c_int, Option<T>),
) -> Result<Option<T>, UserError> {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match call(&mut buf) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // "Not found" comes back as one of these from some NSS modules.
            (libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM, _) => return Ok(None),
            (e, _) => {
                return Err(UserError::Lookup(
                    shown.into(),
                    io::Error::from_raw_os_error(e),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_ids_and_groups() {
        // Accounts every system has besides root: daemon (1) and nobody
        // (65534) in Debian's base-passwd.
        let d: RunAs = "daemon".parse().unwrap();
        assert_eq!(d.uid, 1);
        assert_eq!(d.name.as_deref(), Some(c"daemon"));
        let r: RunAs = "1:4321".parse().unwrap();
        assert_eq!((r.uid, r.gid, r.name), (1, 4321, d.name.clone()));
        let r: RunAs = "daemon:root".parse().unwrap();
        assert_eq!((r.uid, r.gid), (1, 0));
        for root in ["root", "0", "0:0", "root:1"] {
            assert!(
                matches!(root.parse::<RunAs>(), Err(UserError::Root(_))),
                "{root}"
            );
        }
        for none in ["4294967295:1", "daemon:4294967295"] {
            assert!(
                matches!(none.parse::<RunAs>(), Err(UserError::NoChange(_))),
                "{none}"
            );
        }
        // An id without an account needs its group.
        let r: RunAs = "4242:4343".parse().unwrap();
        assert_eq!((r.uid, r.gid, r.name), (4242, 4343, None));
        assert!(matches!(
            "4242".parse::<RunAs>(),
            Err(UserError::NoPrimaryGroup(4242))
        ));
        assert!(matches!(
            "no-such-user-rimg".parse::<RunAs>(),
            Err(UserError::NoUser(_))
        ));
        assert!(matches!(
            "daemon:no-such-group-rimg".parse::<RunAs>(),
            Err(UserError::NoGroup(_))
        ));
        assert!(matches!(
            "ro\0ot".parse::<RunAs>(),
            Err(UserError::NoUser(_))
        ));
    }
}
