//! Where the master key comes from: `DROVER_MASTER_KEY` (hex or base64 of 32 bytes) when
//! set, else a key file (`secrets.master_key_file`, by default
//! `<data_dir>/secrets/master.key`) made on first use, readable by its owner only. During a
//! rotation the key being replaced waits beside it as `master.key.old` (or, with keys from
//! the environment, in `DROVER_MASTER_KEY_OLD`) so every value opens whatever moment a
//! rotation is interrupted at. Key material is never logged nor put in an error message.
//!
//! Everything here is blocking file IO: call it from a blocking context.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::crypto::{CryptoError, Keyring, MasterKey};

/// The variable holding the master key, when it is not kept in a file.
pub const MASTER_KEY_ENV: &str = "DROVER_MASTER_KEY";
/// The variable holding the previous master key during a rotation with keys from the
/// environment.
pub const OLD_MASTER_KEY_ENV: &str = "DROVER_MASTER_KEY_OLD";
/// The key file's name in its default place, `<data_dir>/secrets/`.
pub const MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot use the master key file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "the master key file {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{origin}: {source}")]
    Invalid { origin: String, source: CryptoError },
    #[error(
        "the master key comes from {MASTER_KEY_ENV}; to rotate it, set {OLD_MASTER_KEY_ENV} to \
         the current key and {MASTER_KEY_ENV} to a new one (e.g. `openssl rand -base64 32`), \
         then run this again"
    )]
    EnvKeyUnchanged,
}

/// Where the master key (and, during a rotation, the previous one) is read from.
#[derive(Clone)]
pub struct KeySource {
    file: PathBuf,
    env_key: Option<String>,
    env_old_key: Option<String>,
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySource")
            .field("file", &self.file)
            .field("from_env", &self.env_key.is_some())
            .finish_non_exhaustive()
    }
}

/// Where the keys of a [`KeySource`] came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOrigin {
    File(PathBuf),
    Env,
}

impl fmt::Display for KeyOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Env => f.write_str(MASTER_KEY_ENV),
        }
    }
}

impl KeySource {
    /// Keys from `file` only.
    pub fn file(file: impl Into<PathBuf>) -> Self {
        Self { file: file.into(), env_key: None, env_old_key: None }
    }

    /// Keys from `DROVER_MASTER_KEY` / `DROVER_MASTER_KEY_OLD` when set, else from `file`.
    pub fn from_process_env(file: impl Into<PathBuf>) -> Self {
        let var = |name| std::env::var(name).ok().filter(|value: &String| !value.trim().is_empty());
        Self::file(file).with_env_keys(var(MASTER_KEY_ENV), var(OLD_MASTER_KEY_ENV))
    }

    /// Keys given as text (what the environment would hold) instead of the variables.
    #[must_use]
    pub fn with_env_keys(mut self, key: Option<String>, old_key: Option<String>) -> Self {
        self.env_key = key;
        self.env_old_key = old_key;
        self
    }

    pub fn origin(&self) -> KeyOrigin {
        match self.env_key {
            Some(_) => KeyOrigin::Env,
            None => KeyOrigin::File(self.file.clone()),
        }
    }

    pub fn key_file(&self) -> &Path {
        &self.file
    }

    /// Where the key being rotated away from waits: `master.key.old`.
    pub fn old_key_file(&self) -> PathBuf {
        let mut name = self.file.as_os_str().to_owned();
        name.push(".old");
        PathBuf::from(name)
    }

    /// The keyring to seal and open with: the current key (made and written to the key
    /// file if there is none and none comes from the environment), plus every previous key
    /// still around (`master.key.old`, `DROVER_MASTER_KEY_OLD`, and the key file itself
    /// when the current key comes from the environment).
    pub fn load_or_create(&self) -> Result<Keyring, KeyError> {
        let mut keyring = match &self.env_key {
            Some(text) => {
                let keyring = Keyring::new(parse(text, MASTER_KEY_ENV)?);
                match read_key(&self.file)? {
                    Some(file_key) => keyring.with_previous(file_key),
                    None => keyring,
                }
            }
            None => Keyring::new(match read_key(&self.file)? {
                Some(key) => key,
                None => create_key(&self.file)?,
            }),
        };
        if let Some(text) = &self.env_old_key {
            keyring = keyring.with_previous(parse(text, OLD_MASTER_KEY_ENV)?);
        }
        if let Some(old) = read_key(&self.old_key_file())? {
            keyring = keyring.with_previous(old);
        }
        Ok(keyring)
    }

    /// Whether a rotation left the previous key file behind (it was interrupted).
    pub fn has_old_key_file(&self) -> bool {
        self.old_key_file().exists()
    }

    pub(crate) fn env_key(&self) -> Option<&str> {
        self.env_key.as_deref()
    }
}

fn parse(text: &str, origin: &str) -> Result<MasterKey, KeyError> {
    MasterKey::parse(text).map_err(|source| KeyError::Invalid { origin: origin.to_owned(), source })
}

/// The key in `path`, if the file exists. Refuses a file others can read.
pub(crate) fn read_key(path: &Path) -> Result<Option<MasterKey>, KeyError> {
    let io = |source| KeyError::Io { path: path.to_path_buf(), source };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io(err)),
    };
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.to_path_buf(), mode });
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
    parse(&text, &path.display().to_string()).map(Some)
}

/// Makes a new key and writes it to `path` (0600, directory 0700).
fn create_key(path: &Path) -> Result<MasterKey, KeyError> {
    let key = MasterKey::generate();
    write_key(path, &key)?;
    tracing::info!(path = %path.display(), key_id = %key.id(), "created the secrets master key");
    Ok(key)
}

/// Writes `key` to `path` atomically: a private temporary file beside it, synced, then
/// renamed over it, then the directory synced, so a crash leaves the old key or the new
/// one, never half of one.
pub(crate) fn write_key(path: &Path, key: &MasterKey) -> Result<(), KeyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyError::Io { path, source }
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io(&partial))?;
    let mut text = key.encode();
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(io(&partial))?;
    file.sync_all().map_err(io(&partial))?;
    drop(file);
    std::fs::rename(&partial, path).map_err(io(path))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

/// Removes the previous key file once nothing needs it.
pub(crate) fn remove_key(path: &Path) -> Result<(), KeyError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(KeyError::Io { path: path.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_file_is_made_once_private_and_loaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let source = KeySource::file(dir.path().join("secrets/master.key"));
        let first = source.load_or_create().unwrap();
        let mode = std::fs::metadata(source.key_file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("secrets")).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let again = source.load_or_create().unwrap();
        assert_eq!(first.current().id(), again.current().id());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let source = KeySource::file(dir.path().join("master.key"));
        source.load_or_create().unwrap();
        std::fs::set_permissions(source.key_file(), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        assert!(matches!(source.load_or_create(), Err(KeyError::TooOpen { .. })));
    }

    #[test]
    fn a_key_from_the_environment_wins_and_the_file_still_opens_old_values() {
        let dir = tempfile::tempdir().unwrap();
        let file_key = KeySource::file(dir.path().join("master.key")).load_or_create().unwrap();
        let env_key = MasterKey::generate();
        let source = KeySource::file(dir.path().join("master.key"))
            .with_env_keys(Some(env_key.encode().to_string()), None);
        let keyring = source.load_or_create().unwrap();
        assert_eq!(keyring.current().id(), env_key.id());
        assert_eq!(keyring.previous_ids(), vec![file_key.current().id().clone()]);
        assert_eq!(source.origin(), KeyOrigin::Env);

        let bad = KeySource::file(dir.path().join("none.key"))
            .with_env_keys(Some("not a key".to_owned()), None);
        let err = bad.load_or_create().unwrap_err().to_string();
        assert!(err.contains(MASTER_KEY_ENV) && !err.contains("not a key"), "{err}");
        assert!(!dir.path().join("none.key").exists(), "no file is made with an env key");
    }
}
