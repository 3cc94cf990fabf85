//! JSON printed the way qemu-img prints it (4-space indent, empty arrays
//! and objects opened and closed on separate lines), so output diffs clean
//! against qemu-img's.

use serde_json::Value;

pub fn to_qemu_string(v: &Value) -> String {
    let mut s = String::new();
    write(&mut s, v, 0);
    s
}

fn write(s: &mut String, v: &Value, depth: usize) {
    let pad = |n: usize| "    ".repeat(n);
    match v {
        Value::Array(a) => {
            s.push_str("[\n");
            for (i, x) in a.iter().enumerate() {
                s.push_str(&pad(depth + 1));
                write(s, x, depth + 1);
                s.push_str(if i + 1 < a.len() { ",\n" } else { "\n" });
            }
            s.push_str(&pad(depth));
            s.push(']');
        }
        Value::Object(o) => {
            s.push_str("{\n");
            for (i, (k, x)) in o.iter().enumerate() {
                s.push_str(&pad(depth + 1));
                s.push_str(&Value::String(k.clone()).to_string());
                s.push_str(": ");
                write(s, x, depth + 1);
                s.push_str(if i + 1 < o.len() { ",\n" } else { "\n" });
            }
            s.push_str(&pad(depth));
            s.push('}');
        }
        scalar => s.push_str(&scalar.to_string()),
    }
}
