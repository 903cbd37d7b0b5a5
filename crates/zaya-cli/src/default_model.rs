//! The embedded default model: a small ZAYA1-architecture model trained with `zaya train`
//! on the shipped corpus (see models/default/README.md), compiled into the binary so that
//! `zaya generate` and `zaya chat` work on a fresh machine without `--model`. On first use
//! the files are written to the user's cache directory (atomically: a temporary directory
//! renamed into place) and loaded from there like any model directory.

use std::path::PathBuf;

use anyhow::{Context, Result};

const FILES: &[(&str, &[u8])] = &[
    (
        "config.json",
        include_bytes!("../../../models/default/config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../../../models/default/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../../../models/default/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../../../models/default/tokenizer_config.json"),
    ),
    (
        "special_tokens_map.json",
        include_bytes!("../../../models/default/special_tokens_map.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../../../models/default/generation_config.json"),
    ),
    (
        "chat_template.jinja",
        include_bytes!("../../../models/default/chat_template.jinja"),
    ),
];

/// FNV-1a over the embedded files: a new build with other weights gets its own directory.
fn fingerprint() -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for (name, bytes) in FILES {
        for b in name.bytes().chain(bytes.iter().copied()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("ZAYA_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("zaya");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("zaya");
    }
    std::env::temp_dir().join("zaya-cache")
}

/// Directory holding the default model, written on first use.
pub fn dir() -> Result<PathBuf> {
    let dir = cache_root().join(format!("default-{:016x}", fingerprint()));
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    let parent = dir.parent().expect("cache dir has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-default-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for (name, bytes) in FILES {
        std::fs::write(tmp.join(name), bytes)
            .with_context(|| format!("writing {}", tmp.join(name).display()))?;
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // another process won the race: use its copy
        Err(_) if dir.join("model.safetensors").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(e)
                .with_context(|| format!("installing the default model in {}", dir.display()))
        }
    }
    Ok(dir)
}
