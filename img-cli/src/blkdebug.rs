//! qemu-img's blkdebug driver, as far as the engine's events go: rules
//! from a config file (`[inject-error]`, `[set-state]` sections) or from
//! options; an event activates its inject-error rules (in the rule's
//! state), and the next I/O of a matching kind fails with the rule's errno.

use std::sync::Mutex;

use qcow2::storage::{Faults, IoKind};

use crate::CliError;

#[derive(Debug, Clone)]
pub struct Rule {
    event: String,
    /// Only in this state (0: any).
    state: u64,
    kind: RuleKind,
}

#[derive(Debug, Clone)]
enum RuleKind {
    Inject {
        errno: i32,
        once: bool,
        /// Byte offset the failing I/O must cover (`sector` * 512).
        offset: Option<u64>,
        iotype: Option<IoKind>,
    },
    SetState(u64),
}

fn bad(msg: String) -> CliError {
    CliError::new(msg)
}

fn num(key: &str, v: &str) -> Result<u64, CliError> {
    v.parse()
        .map_err(|_| bad(format!("Parameter '{key}' expects a number")))
}

fn boolean(key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(bad(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

impl Rule {
    /// A rule from its options (`inject` for an inject-error rule, else
    /// set-state).
    pub fn from_pairs(inject: bool, kv: &[(String, String)]) -> Result<Rule, CliError> {
        let get = |k: &str| kv.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        let event = get("event")
            .ok_or_else(|| bad("Missing event name for rule".into()))?
            .to_string();
        let state = get("state")
            .map(|v| num("state", v))
            .transpose()?
            .unwrap_or(0);
        let known: &[&str] = if inject {
            &[
                "event",
                "state",
                "errno",
                "once",
                "immediately",
                "sector",
                "iotype",
            ]
        } else {
            &["event", "state", "new_state"]
        };
        if let Some((k, _)) = kv.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            return Err(bad(format!("Invalid parameter '{k}'")));
        }
        let kind = if inject {
            RuleKind::Inject {
                errno: get("errno")
                    .map(|v| num("errno", v))
                    .transpose()?
                    .unwrap_or(5) as i32,
                once: get("once")
                    .map(|v| boolean("once", v))
                    .transpose()?
                    .unwrap_or(false),
                offset: get("sector")
                    .map(|v| num("sector", v).map(|s| s.saturating_mul(512)))
                    .transpose()?,
                iotype: match get("iotype") {
                    None => None,
                    Some("read") => Some(IoKind::Read),
                    Some("write") => Some(IoKind::Write),
                    Some("write-zeroes") => Some(IoKind::WriteZeroes),
                    Some("discard") => Some(IoKind::Discard),
                    Some("flush") => Some(IoKind::Flush),
                    Some(o) => {
                        return Err(bad(format!("Invalid parameter value '{o}' for 'iotype'")))
                    }
                },
            }
        } else {
            RuleKind::SetState(
                get("new_state")
                    .map(|v| num("new_state", v))
                    .transpose()?
                    .unwrap_or(0),
            )
        };
        Ok(Rule { event, state, kind })
    }
}

/// Reads a blkdebug config file: `[inject-error]` / `[set-state]`
/// sections of `key = "value"` lines.
pub fn read_config(path: &str) -> Result<Vec<Rule>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        bad(format!(
            "Could not read blkdebug config file: {}",
            crate::common::strerror(&e)
        ))
    })?;
    let mut rules = Vec::new();
    let mut section: Option<(bool, Vec<(String, String)>)> = None;
    let flush = |s: Option<(bool, Vec<(String, String)>)>, rules: &mut Vec<Rule>| {
        if let Some((inject, kv)) = s {
            rules.push(Rule::from_pairs(inject, &kv)?);
        }
        Ok::<(), CliError>(())
    };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            flush(section.take(), &mut rules)?;
            let inject = match name.trim() {
                "inject-error" => true,
                "set-state" => false,
                o => return Err(bad(format!("Invalid group name '{o}' in blkdebug config"))),
            };
            section = Some((inject, Vec::new()));
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad(format!("Invalid line '{line}' in blkdebug config")))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        match &mut section {
            Some((_, kv)) => kv.push((k.trim().to_string(), v.to_string())),
            None => {
                return Err(bad(format!(
                    "Option '{}' outside a group in blkdebug config",
                    k.trim()
                )))
            }
        }
    }
    flush(section, &mut rules)?;
    Ok(rules)
}

#[derive(Debug)]
struct State {
    state: u64,
    /// Indexes of the inject-error rules an event activated.
    active: Vec<usize>,
    /// Rules taken out (fired with `once`).
    removed: Vec<bool>,
}

/// A blkdebug node's rules and state.
#[derive(Debug)]
pub struct Blkdebug {
    rules: Vec<Rule>,
    st: Mutex<State>,
}

impl Blkdebug {
    pub fn new(rules: Vec<Rule>) -> Blkdebug {
        let n = rules.len();
        let b = Blkdebug {
            rules,
            st: Mutex::new(State {
                state: 1,
                active: Vec::new(),
                removed: vec![false; n],
            }),
        };
        // QEMU's blkdebug ends its open with the event "none": its rules
        // hold from the first I/O on.
        b.event("none");
        b
    }
}

impl Faults for Blkdebug {
    fn event(&self, name: &str) {
        let mut s = self.st.lock().unwrap();
        let mut new_state = s.state;
        let mut injects = 0;
        // QEMU keeps an event's rules newest first and puts each one it
        // activates first: the active set ends up in the order given, and
        // the first rule given that matches an I/O fails it.
        for (i, r) in self.rules.iter().enumerate().rev() {
            if r.event != name || s.removed[i] || (r.state != 0 && r.state != s.state) {
                continue;
            }
            match r.kind {
                RuleKind::Inject { .. } => {
                    // The first rule an event activates replaces the
                    // active set.
                    if injects == 0 {
                        s.active.clear();
                    }
                    injects += 1;
                    s.active.insert(0, i);
                }
                RuleKind::SetState(n) => new_state = n,
            }
        }
        s.state = new_state;
    }

    fn swallowed(&self, what: &str, err: &qcow2::Error) {
        eprintln!("{what}: {}", crate::common::os_error_text(err));
    }

    fn check(&self, kind: IoKind, off: u64, len: u64) -> Option<i32> {
        let mut s = self.st.lock().unwrap();
        let pos = s.active.iter().position(|&i| match self.rules[i].kind {
            RuleKind::Inject { offset, iotype, .. } => {
                offset.is_none_or(|o| len > 0 && o >= off && o < off + len)
                    && match iotype {
                        Some(t) => t == kind,
                        None => true,
                    }
            }
            RuleKind::SetState(_) => false,
        })?;
        let i = s.active[pos];
        let RuleKind::Inject { errno, once, .. } = self.rules[i].kind else {
            return None;
        };
        if errno == 0 {
            return None;
        }
        if once {
            s.active.remove(pos);
            s.removed[i] = true;
        }
        Some(errno)
    }
}
