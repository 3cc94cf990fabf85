//! QEMU's JSON dialect, as `json:{...}` filenames are written: standard
//! JSON plus single-quoted strings. Bounded nesting and length, so hostile
//! input gives an error, never a deep recursion.

use serde_json::{Map, Number, Value};

/// Deepest nesting accepted (QEMU's parser stops at 64 too).
const MAX_DEPTH: usize = 64;
/// Longest text accepted.
const MAX_LEN: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
pub enum JsonError {
    TooLong,
    TooDeep,
    Syntax(usize),
    Trailing,
}

impl std::fmt::Display for JsonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JsonError::TooLong => write!(f, "JSON text longer than {MAX_LEN} bytes"),
            JsonError::TooDeep => write!(f, "JSON nesting deeper than {MAX_DEPTH}"),
            JsonError::Syntax(at) => write!(f, "JSON parse error at byte {at}"),
            JsonError::Trailing => write!(f, "Expecting a single JSON value"),
        }
    }
}

pub fn parse(s: &str) -> Result<Value, JsonError> {
    if s.len() > MAX_LEN {
        return Err(JsonError::TooLong);
    }
    let mut p = Parser {
        b: s.as_bytes(),
        i: 0,
    };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.b.len() {
        return Err(JsonError::Trailing);
    }
    Ok(v)
}

struct Parser<'a> {
    b: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn err(&self) -> JsonError {
        JsonError::Syntax(self.i)
    }
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, JsonError> {
        if depth > MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.ws();
        match self.b.get(self.i).copied() {
            Some(b'{') => {
                self.i += 1;
                let mut m = Map::new();
                if self.eat(b'}') {
                    return Ok(Value::Object(m));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    if !self.eat(b':') {
                        return Err(self.err());
                    }
                    let v = self.value(depth + 1)?;
                    m.insert(k, v);
                    if self.eat(b'}') {
                        return Ok(Value::Object(m));
                    }
                    if !self.eat(b',') {
                        return Err(self.err());
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = Vec::new();
                if self.eat(b']') {
                    return Ok(Value::Array(a));
                }
                loop {
                    a.push(self.value(depth + 1)?);
                    if self.eat(b']') {
                        return Ok(Value::Array(a));
                    }
                    if !self.eat(b',') {
                        return Err(self.err());
                    }
                }
            }
            Some(b'"') | Some(b'\'') => Ok(Value::String(self.string()?)),
            Some(b't') => self.word("true", Value::Bool(true)),
            Some(b'f') => self.word("false", Value::Bool(false)),
            Some(b'n') => self.word("null", Value::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            _ => Err(self.err()),
        }
    }

    fn word(&mut self, w: &str, v: Value) -> Result<Value, JsonError> {
        if self.b[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            Err(self.err())
        }
    }

    fn number(&mut self) -> Result<Value, JsonError> {
        let start = self.i;
        self.i += 1;
        while self.i < self.b.len()
            && matches!(
                self.b[self.i],
                b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'
            )
        {
            self.i += 1;
        }
        let t =
            std::str::from_utf8(&self.b[start..self.i]).map_err(|_| JsonError::Syntax(start))?;
        if let Ok(n) = t.parse::<i64>() {
            return Ok(Value::Number(n.into()));
        }
        if let Ok(n) = t.parse::<u64>() {
            return Ok(Value::Number(n.into()));
        }
        t.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or(JsonError::Syntax(start))
    }

    fn string(&mut self) -> Result<String, JsonError> {
        let q = match self.b.get(self.i) {
            Some(&q @ (b'"' | b'\'')) => q,
            _ => return Err(self.err()),
        };
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.i) else {
                return Err(self.err());
            };
            self.i += 1;
            match c {
                _ if c == q => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.i) else {
                        return Err(self.err());
                    };
                    self.i += 1;
                    let ch = match e {
                        b'"' | b'\'' | b'\\' | b'/' => e as char,
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let h = self.b.get(self.i..self.i + 4).ok_or(self.err())?;
                            let h = std::str::from_utf8(h).map_err(|_| self.err())?;
                            let n = u32::from_str_radix(h, 16).map_err(|_| self.err())?;
                            self.i += 4;
                            char::from_u32(n).ok_or(self.err())?
                        }
                        _ => return Err(self.err()),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quotes_and_nesting() {
        let v = parse("{'a': {\"b\": [1, true, null]}, 'c': 'x\\'y'}").unwrap();
        assert_eq!(v["a"]["b"][0], 1);
        assert_eq!(v["c"], "x'y");
    }

    #[test]
    fn hostile_input_is_an_error() {
        let deep = "[".repeat(100_000);
        assert_eq!(parse(&deep), Err(JsonError::TooDeep));
        let long = format!("'{}'", "a".repeat(MAX_LEN + 1));
        assert_eq!(parse(&long), Err(JsonError::TooLong));
        assert!(parse("{'a' 1}").is_err());
        assert!(parse("{} x").is_err());
        assert!(parse("'unterminated").is_err());
    }
}
