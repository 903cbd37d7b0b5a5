//! Mutations: byte-level edits for any part, and document edits for parts that parse as
//! JSON (so the mutant still parses and reaches the checks behind the parser).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Number, Value};

use crate::Input;

/// Bytes that matter to the formats under test (JSON, Jinja, UTF-8 boundaries).
const INTERESTING_BYTES: &[u8] = b"\0\xff\x80\xc3\xe2\xf0\"\\{}[],:.-+eE0123456789 \n\t<>|%#'";

/// Text fragments spliced into parts: JSON and Jinja syntax, numbers at the limits of the
/// integer and float types, special tokens.
const DICTIONARY: &[&str] = &[
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{%-",
    "-%}",
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "\"\"",
    "-1",
    "0",
    "1e400",
    "-1e400",
    "NaN",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967295",
    "4294967296",
    "2147483648",
    "0.5",
    "1e-45",
    "\\u0000",
    "\\ud800",
    "\u{1F600}",
    "<bos>",
    "<eos>",
    "<end_of_turn>",
    "<start_of_turn>",
    "<think>",
    "</think>",
    "<zyphra_tool_call>",
    "</zyphra_tool_call>",
    " for x in messages ",
    " endfor ",
    " if ",
    " endif ",
    " else ",
    " set ns = namespace(a=1) ",
    "raise_exception('x')",
    "|tojson",
    "|items",
    "|join(',')",
    "|length",
    "|string",
    "|trim",
    "loop.index0",
    "loop.previtem",
    "messages[-1]",
    "messages[0]['content']",
    "range(100000)",
    "'ab' * 1000000",
    "[1] * 1000000",
    "x.split('a')",
    "strftime_now('%Y')",
    " recursive ",
    "loop(x)",
    " macro m() ",
    " endmacro ",
    "m()",
    "caller()",
    " call m() ",
    " endcall ",
    "\"dtype\":\"F64\"",
    "\"dtype\":\"BOOL\"",
    "\"shape\":[]",
    "\"data_offsets\":[0,0]",
    "\"__metadata__\":{}",
    "../",
    "/etc/passwd",
    "model-00001-of-00002.safetensors",
];

/// Seeded mutation engine; `pool` holds the seeds, spliced into mutants.
pub struct Mutator {
    rng: StdRng,
    pool: Vec<Input>,
}

impl Mutator {
    pub fn new(seed: u64, pool: Vec<Input>) -> Self {
        Mutator {
            rng: StdRng::seed_from_u64(seed),
            pool,
        }
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Mutates one part of `input`: a document edit when it is JSON (most of the time),
    /// byte edits otherwise or sometimes anyway.
    pub fn mutate_input(&mut self, input: &mut Input) {
        if input.is_empty() {
            input.push(Vec::new());
        }
        let i = self.rng.random_range(0..input.len());
        self.mutate_part(input, i);
    }

    /// Mutates part `i` of `input`.
    pub fn mutate_part(&mut self, input: &mut Input, i: usize) {
        let json_first = self.rng.random_bool(0.75);
        if json_first {
            if let Ok(mut doc) = serde_json::from_slice::<Value>(&input[i]) {
                let edits = 1 + self.rng.random_range(0..3);
                for _ in 0..edits {
                    self.mutate_json(&mut doc);
                }
                input[i] = if self.rng.random_bool(0.5) {
                    serde_json::to_vec(&doc).expect("a Value serialises")
                } else {
                    serde_json::to_vec_pretty(&doc).expect("a Value serialises")
                };
                return;
            }
        }
        let donor = self.donor_part(i);
        self.mutate_bytes(&mut input[i], &donor);
    }

    /// Part `i` of a random seed (or an empty part).
    fn donor_part(&mut self, i: usize) -> Vec<u8> {
        if self.pool.is_empty() {
            return Vec::new();
        }
        let s = self.rng.random_range(0..self.pool.len());
        self.pool[s].get(i).cloned().unwrap_or_default()
    }

    /// One to four byte-level edits.
    pub fn mutate_bytes(&mut self, bytes: &mut Vec<u8>, donor: &[u8]) {
        let edits = 1 + self.rng.random_range(0..4);
        for _ in 0..edits {
            let len = bytes.len();
            let pos = if len == 0 {
                0
            } else {
                self.rng.random_range(0..len)
            };
            match self.rng.random_range(0..10) {
                0 if len > 0 => bytes[pos] ^= 1 << self.rng.random_range(0..8),
                1 if len > 0 => bytes[pos] = self.rng.random(),
                2 if len > 0 => {
                    bytes[pos] =
                        INTERESTING_BYTES[self.rng.random_range(0..INTERESTING_BYTES.len())]
                }
                3 if len > 0 => {
                    let end = (pos + 1 + self.rng.random_range(0..16)).min(len);
                    bytes.drain(pos..end);
                }
                4 => {
                    let n = 1 + self.rng.random_range(0..8);
                    let fresh: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                    bytes.splice(pos..pos, fresh);
                }
                5 => {
                    let word = DICTIONARY[self.rng.random_range(0..DICTIONARY.len())];
                    bytes.splice(pos..pos, word.bytes());
                }
                6 if len > 0 => {
                    // duplicate a range (repeated structure)
                    let end = (pos + 1 + self.rng.random_range(0..64)).min(len);
                    let chunk = bytes[pos..end].to_vec();
                    bytes.splice(pos..pos, chunk);
                }
                7 if len > 0 => bytes.truncate(pos),
                8 if !donor.is_empty() => {
                    // splice in a range of another seed
                    let a = self.rng.random_range(0..donor.len());
                    let b = (a + 1 + self.rng.random_range(0..256)).min(donor.len());
                    let end = (pos + self.rng.random_range(0..64)).min(len);
                    bytes.splice(pos..end, donor[a..b].iter().copied());
                }
                _ if len >= 8 => {
                    // overwrite with a little-endian integer at a limit (binary headers)
                    let v: u64 = match self.rng.random_range(0..6) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => u32::MAX as u64,
                        3 => 1 << 63,
                        4 => len as u64 + self.rng.random_range(0..16),
                        _ => self.rng.random_range(0..4096),
                    };
                    let at = self.rng.random_range(0..=len - 8);
                    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                _ => bytes.push(self.rng.random()),
            }
        }
    }

    /// One edit of a JSON document at a random node.
    pub fn mutate_json(&mut self, doc: &mut Value) {
        let count = count_nodes(doc);
        let target = self.rng.random_range(0..count);
        let mut seen = 0;
        let replacement = self.random_value(doc);
        let op = self.rng.random_range(0..8);
        let pick = self.rng.random::<u64>();
        edit_nth(doc, target, &mut seen, &mut |node| match op {
            // replace by a value of another kind or at a limit
            0..=2 => *node = replacement.clone(),
            // numbers: nearby and extreme values
            3 => {
                if let Some(n) = node.as_i64() {
                    *node = Value::from(match pick % 5 {
                        0 => n.wrapping_add(1),
                        1 => n.wrapping_sub(1),
                        2 => n.wrapping_mul(2),
                        3 => -n,
                        _ => 0,
                    });
                } else {
                    *node = replacement.clone();
                }
            }
            // containers: remove, duplicate or reorder members
            4 | 5 => match node {
                Value::Array(a) if !a.is_empty() => {
                    let i = (pick as usize) % a.len();
                    if op == 4 {
                        a.remove(i);
                    } else {
                        let x = a[i].clone();
                        a.insert(i, x);
                    }
                }
                Value::Object(o) if !o.is_empty() => {
                    let i = (pick as usize) % o.len();
                    let key = o.keys().nth(i).cloned().expect("index in range");
                    if op == 4 {
                        o.remove(&key);
                    } else {
                        o.insert(format!("{key}_"), replacement.clone());
                    }
                }
                _ => *node = replacement.clone(),
            },
            6 => {
                if let Value::Array(a) = node {
                    a.reverse();
                } else if let Value::String(s) = node {
                    let cut = (pick as usize) % (s.len() + 1);
                    let cut = (0..=cut)
                        .rev()
                        .find(|&c| s.is_char_boundary(c))
                        .unwrap_or(0);
                    s.truncate(cut);
                } else {
                    *node = replacement.clone();
                }
            }
            // strings: splice in a dictionary word
            _ => {
                if let Value::String(s) = node {
                    let word = DICTIONARY[(pick as usize) % DICTIONARY.len()];
                    let at = (0..=s.len())
                        .filter(|&c| s.is_char_boundary(c))
                        .nth((pick as usize >> 8) % (s.chars().count() + 1))
                        .unwrap_or(0);
                    s.insert_str(at, word);
                } else {
                    *node = replacement.clone();
                }
            }
        });
    }

    /// A value to put somewhere: limits, other kinds, or a copy of a node of `doc`.
    fn random_value(&mut self, doc: &Value) -> Value {
        match self.rng.random_range(0..14) {
            0 => Value::Null,
            1 => Value::Bool(self.rng.random()),
            2 => Value::from(-1),
            3 => Value::from(0),
            4 => Value::from(u64::MAX),
            5 => Value::from(i64::MIN),
            6 => Value::from(u32::MAX as u64 + 1),
            7 => Number::from_f64(1e300).map_or(Value::Null, Value::Number),
            8 => Number::from_f64(0.5).map_or(Value::Null, Value::Number),
            9 => Value::from(self.rng.random_range(0..70_000u64)),
            10 => Value::String(DICTIONARY[self.rng.random_range(0..DICTIONARY.len())].into()),
            11 => Value::Array(vec![]),
            12 => Value::Object(Map::new()),
            _ => {
                // a copy of another node of the document (right shape, wrong place)
                let n = count_nodes(doc);
                let k = self.rng.random_range(0..n);
                nth_node(doc, k).cloned().unwrap_or(Value::Null)
            }
        }
    }
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

fn nth_node(v: &Value, n: usize) -> Option<&Value> {
    fn go<'a>(v: &'a Value, n: usize, seen: &mut usize) -> Option<&'a Value> {
        if *seen == n {
            return Some(v);
        }
        *seen += 1;
        match v {
            Value::Array(a) => a.iter().find_map(|x| go(x, n, seen)),
            Value::Object(o) => o.values().find_map(|x| go(x, n, seen)),
            _ => None,
        }
    }
    go(v, n, &mut 0)
}

/// Calls `f` on the `target`-th node in pre-order.
fn edit_nth(v: &mut Value, target: usize, seen: &mut usize, f: &mut dyn FnMut(&mut Value)) -> bool {
    if *seen == target {
        f(v);
        return true;
    }
    *seen += 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| edit_nth(x, target, seen, f)),
        Value::Object(o) => o.values_mut().any(|x| edit_nth(x, target, seen, f)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_differ_and_are_reproducible() {
        let seed: Input = vec![br#"{"a": [1, 2, {"b": "text"}], "c": 3.5}"#.to_vec()];
        let run = |s| {
            let mut m = Mutator::new(s, vec![seed.clone()]);
            (0..50)
                .map(|_| {
                    let mut x = seed.clone();
                    m.mutate_input(&mut x);
                    x
                })
                .collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same mutants");
        assert_ne!(a, run(8));
        assert!(a.iter().filter(|x| **x != seed).count() > 40);
        // most mutants of a JSON seed are still JSON (structure-aware edits)
        let json = a
            .iter()
            .filter(|x| serde_json::from_slice::<Value>(&x[0]).is_ok())
            .count();
        assert!(json > 25, "{json} of 50 mutants parse");
    }
}
