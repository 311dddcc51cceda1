//! `drover.json`: what a scaffolded project tells the later stages about itself (how to
//! start it, where its health probe is, what to check end to end, how to run its tests).
//! Whoever scaffolds a project (a template, or later an LLM or coding agent) writes one.

use std::path::Path;

use serde::Deserialize;

pub const MANIFEST_FILE: &str = "drover.json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("the workspace has no {MANIFEST_FILE}; the scaffold stage must write one")]
    Missing,
    #[error("cannot read {MANIFEST_FILE}: {0}")]
    Read(std::io::Error),
    #[error("{MANIFEST_FILE} is invalid: {0}")]
    Invalid(String),
}

/// The project manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    /// The program and arguments that start the app; it reads `PORT`.
    pub start: Vec<String>,
    pub health_path: String,
    #[serde(default)]
    pub checks: Vec<Check>,
    /// The program and arguments that run the project's own tests.
    pub test: Vec<String>,
}

/// One end-to-end request and what its answer must look like.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub path: String,
    pub status: u16,
    #[serde(default)]
    pub contains: Option<String>,
}

impl Manifest {
    pub async fn load(workspace: &Path) -> Result<Self, ManifestError> {
        let text = match tokio::fs::read_to_string(workspace.join(MANIFEST_FILE)).await {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing);
            }
            Err(err) => return Err(ManifestError::Read(err)),
        };
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|err| ManifestError::Invalid(err.to_string()))?;
        if manifest.start.is_empty() {
            return Err(ManifestError::Invalid("`start` must name a program".into()));
        }
        if manifest.test.is_empty() {
            return Err(ManifestError::Invalid("`test` must name a program".into()));
        }
        for path in
            std::iter::once(&manifest.health_path).chain(manifest.checks.iter().map(|c| &c.path))
        {
            if !path.starts_with('/') {
                return Err(ManifestError::Invalid(format!("path `{path}` must start with `/`")));
            }
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_manifest_parses() {
        for template in crate::templates::catalog() {
            let text = template
                .files
                .iter()
                .find(|(path, _)| *path == MANIFEST_FILE)
                .map(|(_, text)| *text)
                .unwrap_or_else(|| panic!("{} has no manifest", template.slug));
            Manifest::parse(text).unwrap_or_else(|e| panic!("{}: {e}", template.slug));
        }
    }

    #[test]
    fn a_manifest_without_a_start_command_or_with_a_relative_path_is_invalid() {
        let no_start = r#"{"name":"x","start":[],"health_path":"/h","test":["t"]}"#;
        assert!(Manifest::parse(no_start).unwrap_err().to_string().contains("start"));
        let relative = r#"{"name":"x","start":["a"],"health_path":"h","test":["t"]}"#;
        assert!(Manifest::parse(relative).unwrap_err().to_string().contains("must start with"));
        let unknown = r#"{"name":"x","start":["a"],"health_path":"/h","test":["t"],"extra":1}"#;
        assert!(Manifest::parse(unknown).unwrap_err().to_string().contains("unknown field"));
    }
}
