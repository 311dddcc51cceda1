//! `drover.json`: what a scaffolded project tells the later stages about itself (how to
//! start it, where its health probe is, what to check end to end, how to run its tests).
//! Whoever scaffolds a project (a template, a command or `llm` agent, a coding CLI) may
//! write one; the [`CONTRACT`] in the prompt of a stage that writes the project says how.
//! A manifest may leave keys out: [`crate::project`] completes them by detection.

use std::path::Path;

use serde::Deserialize;

pub const MANIFEST_FILE: &str = "drover.json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {MANIFEST_FILE}: {0}")]
    Read(std::io::Error),
    #[error("{MANIFEST_FILE} is invalid: {0}")]
    Invalid(String),
    #[error("{MANIFEST_FILE} has no `{0}`")]
    MissingKey(&'static str),
}

/// The example manifest the contract shows; a test holds it to the schema.
macro_rules! example_manifest {
    () => {
        r#"{"name": "hello", "start": ["python3", "app.py"], "health_path": "/health", "checks": [{"path": "/", "status": 200, "contains": "Hello"}], "test": ["python3", "-m", "unittest", "discover"]}"#
    };
}
#[cfg(test)]
const EXAMPLE: &str = example_manifest!();

/// What the prompt of a stage that writes the project (`contract = true`, `sdlc`'s
/// `scaffold`) carries after the request.
pub const CONTRACT: &str = concat!(
    "Project contract (drover):\n",
    "- Write the project in the current directory (the workspace). drover then validates, ",
    "starts, tests and deploys it from there.\n",
    "- Describe it in drover.json at the workspace root, a JSON object with these keys and ",
    "no others:\n",
    "  \"name\": the project's name;\n",
    "  \"start\": the program and its arguments that start the app, run without a shell; ",
    "the app listens on 127.0.0.1 at the port in the PORT environment variable;\n",
    "  \"health_path\": a path that answers 2xx once the app is up;\n",
    "  \"checks\" (optional): requests to make once it is up, each ",
    "{\"path\", \"status\", \"contains\" (optional)};\n",
    "  \"test\": the program and its arguments that run the project's tests ",
    "(exit 0 = passed).\n",
    "  Example: ",
    example_manifest!(),
    "\n",
    "- Without drover.json (or for the keys it leaves out), drover tries to detect the ",
    "project: Python, Node (package.json scripts), Go modules, Cargo, or a static site ",
    "(index.html).\n",
);

/// The project manifest, complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    /// The program and arguments that start the app; it reads `PORT`.
    pub start: Vec<String>,
    pub health_path: String,
    pub checks: Vec<Check>,
    /// The program and arguments that run the project's own tests.
    pub test: Vec<String>,
}

/// `drover.json` as written: any key may be missing (detection completes it), none may be
/// unknown, and those present must be valid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    pub name: Option<String>,
    pub start: Option<Vec<String>>,
    pub health_path: Option<String>,
    pub checks: Option<Vec<Check>>,
    pub test: Option<Vec<String>>,
}

/// One end-to-end request and what its answer must look like.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub path: String,
    pub status: u16,
    #[serde(default)]
    pub contains: Option<String>,
}

impl ManifestFile {
    /// The workspace's manifest; `None` if it has none.
    pub async fn load(workspace: &Path) -> Result<Option<Self>, ManifestError> {
        match tokio::fs::read_to_string(workspace.join(MANIFEST_FILE)).await {
            Ok(text) => Self::parse(&text).map(Some),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(ManifestError::Read(err)),
        }
    }

    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let manifest: ManifestFile =
            serde_json::from_str(text).map_err(|err| ManifestError::Invalid(err.to_string()))?;
        if manifest.start.as_ref().is_some_and(Vec::is_empty) {
            return Err(ManifestError::Invalid("`start` must name a program".into()));
        }
        if manifest.test.as_ref().is_some_and(Vec::is_empty) {
            return Err(ManifestError::Invalid("`test` must name a program".into()));
        }
        let paths =
            manifest.health_path.iter().chain(manifest.checks.iter().flatten().map(|c| &c.path));
        for path in paths {
            if !path.starts_with('/') {
                return Err(ManifestError::Invalid(format!("path `{path}` must start with `/`")));
            }
        }
        Ok(manifest)
    }

    /// The keys a complete manifest has that this one leaves out (`checks` is optional).
    pub fn missing_keys(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.name.is_none() {
            missing.push("name");
        }
        if self.start.is_none() {
            missing.push("start");
        }
        if self.health_path.is_none() {
            missing.push("health_path");
        }
        if self.test.is_none() {
            missing.push("test");
        }
        missing
    }
}

impl Manifest {
    /// A complete manifest: every required key present and valid.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let file = ManifestFile::parse(text)?;
        if let Some(key) = file.missing_keys().first() {
            return Err(ManifestError::MissingKey(key));
        }
        Ok(Self {
            name: file.name.unwrap_or_default(),
            start: file.start.unwrap_or_default(),
            health_path: file.health_path.unwrap_or_default(),
            checks: file.checks.unwrap_or_default(),
            test: file.test.unwrap_or_default(),
        })
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

    #[test]
    fn a_partial_manifest_parses_and_names_what_it_leaves_out() {
        let partial = ManifestFile::parse(r#"{"start":["node","server.js"]}"#).unwrap();
        assert_eq!(
            partial.start.as_deref(),
            Some(&["node".to_owned(), "server.js".to_owned()][..])
        );
        assert_eq!(partial.missing_keys(), ["name", "health_path", "test"]);
        let err = Manifest::parse(r#"{"start":["node","server.js"]}"#).unwrap_err();
        assert_eq!(err.to_string(), "drover.json has no `name`");
        // What is present is still checked.
        assert!(ManifestFile::parse(r#"{"test":[]}"#).unwrap_err().to_string().contains("test"));
        assert!(ManifestFile::parse(r#"{"health_path":"h"}"#).is_err());
    }

    #[test]
    fn the_contract_shows_a_manifest_that_parses_and_names_every_key() {
        assert!(CONTRACT.contains(EXAMPLE), "the contract shows the example");
        let example = Manifest::parse(EXAMPLE).unwrap();
        assert_eq!(example.start, ["python3", "app.py"]);
        for key in ["\"name\"", "\"start\"", "\"health_path\"", "\"checks\"", "\"test\"", "PORT"] {
            assert!(CONTRACT.contains(key), "the contract names {key}");
        }
        assert!(CONTRACT.contains(MANIFEST_FILE));
    }
}
