//! qemu-img's `-o key=value,...` option lists.

/// Splits a QEMU option string at its commas, `,,` standing for a
/// literal comma (QemuOpts' syntax, shared by `-o` and `--image-opts`).
pub fn split_options(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// Parsed `-o` options, in the order given (later values win).
#[derive(Debug, Default, Clone)]
pub struct OptList {
    pub items: Vec<(String, String)>,
}

impl OptList {
    /// Parses one or more `-o` arguments: comma separated `key=value`
    /// pairs, where `,,` stands for a literal comma.
    pub fn parse(args: &[String]) -> Result<OptList, String> {
        let mut items = Vec::new();
        for arg in args {
            let parts = split_options(arg);
            for p in parts.into_iter().filter(|p| !p.is_empty()) {
                match p.split_once('=') {
                    Some((k, v)) => items.push((k.to_string(), v.to_string())),
                    None if p == "help" || p == "?" => items.push((p, String::new())),
                    // QemuOpts' implied booleans: `key` is key=on, `nokey`
                    // key=off (whatever the key).
                    None => match p.strip_prefix("no") {
                        Some(k) => items.push((k.to_string(), "off".into())),
                        None => items.push((p, "on".into())),
                    },
                }
            }
        }
        Ok(OptList { items })
    }

    pub fn wants_help(&self) -> bool {
        self.items.iter().any(|(k, _)| k == "help" || k == "?")
    }
}

/// qemu's boolean option values.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}
