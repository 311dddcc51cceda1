//! The project the built-in stages work on: what `drover.json` says, completed by
//! detection where it says nothing (no manifest, or one that leaves keys out).
//!
//! Detection looks at the workspace's files (a bounded walk, [`crate::walk`]) and the few
//! that say what a project is, and knows five kinds, tried in this order: Cargo
//! (`Cargo.toml`), Go modules (`go.mod`), Node (`package.json`), Python
//! (`requirements.txt`, `pyproject.toml`, `setup.py`, `Pipfile` or `.py` files) and a static
//! site (`index.html` at the root or in `public/`, `site/`, `www/`, `dist/`, `docs/`,
//! `build/`). For each it says how to start the app (listening on `PORT`), its health
//! path, what to check end to end, how to run its tests and what validates it; what it
//! cannot say it explains (an `Err` naming what it looked for). [`detect`] and
//! [`combine`] are pure; [`resolve`] reads the workspace and the `PATH` and calls them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::manifest::{Check, ManifestFile};
use crate::{AgentFailure, MANIFEST_FILE};

/// Files the detector lists at most.
const MAX_FILES: usize = 5_000;
/// Bytes of one file the detector reads at most.
const MAX_READ_BYTES: u64 = 256 * 1024;
/// Source files searched for a health path, at most.
const MAX_SEARCHED_SOURCES: usize = 200;
/// Files `node --check` is run on, at most.
const MAX_NODE_CHECKS: usize = 100;
/// Pages of a static site checked end to end, at most (besides `/`).
const MAX_PAGE_CHECKS: usize = 20;

/// The kinds of project detection knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Cargo,
    Go,
    Node,
    Python,
    Static,
}

impl Kind {
    pub(crate) fn slug(self) -> &'static str {
        match self {
            Self::Cargo => "cargo",
            Self::Go => "go",
            Self::Node => "node",
            Self::Python => "python",
            Self::Static => "static",
        }
    }

    /// How a sentence names it: "a Python project".
    pub(crate) fn described(self) -> &'static str {
        match self {
            Self::Cargo => "a Cargo project",
            Self::Go => "a Go project",
            Self::Node => "a Node project",
            Self::Python => "a Python project",
            Self::Static => "a static site",
        }
    }
}

/// What detection looks for, as its failure says.
const LOOKED_FOR: &str = "Cargo.toml (Cargo), go.mod (Go), package.json (Node), \
    requirements.txt, pyproject.toml, setup.py, Pipfile or *.py files (Python), index.html \
    (a static site, at the root or in public/, site/, www/, dist/, docs/ or build/)";

/// The workspace as detection sees it: its files, and the contents of those it asks for.
pub(crate) struct Workspace {
    root: PathBuf,
    /// Relative, `/`-separated, sorted.
    files: Vec<String>,
}

impl Workspace {
    /// Lists the workspace's files (blocking; bounded).
    pub(crate) fn scan(root: &Path) -> Self {
        let files =
            crate::walk::files(root, MAX_FILES).entries.into_iter().map(|e| e.path).collect();
        Self { root: root.to_path_buf(), files }
    }

    fn has(&self, path: &str) -> bool {
        self.files.binary_search_by(|file| file.as_str().cmp(path)).is_ok()
    }

    /// The first of `candidates` the workspace has.
    fn first_of<'a>(&self, candidates: &[&'a str]) -> Option<&'a str> {
        candidates.iter().copied().find(|path| self.has(path))
    }

    /// A file's text (its first [`MAX_READ_BYTES`]), if it is there and readable.
    fn read(&self, path: &str) -> Option<String> {
        use std::io::Read;
        let file = std::fs::File::open(self.root.join(path)).ok()?;
        let mut text = String::new();
        file.take(MAX_READ_BYTES).read_to_string(&mut text).ok()?;
        Some(text)
    }

    fn ending_with<'a>(&'a self, suffixes: &'a [&str]) -> impl Iterator<Item = &'a str> + 'a {
        self.files
            .iter()
            .map(String::as_str)
            .filter(move |path| suffixes.iter().any(|suffix| path.ends_with(suffix)))
    }

    /// The workspace directory's own name, for a project that names itself nowhere.
    fn dir_name(&self) -> String {
        self.root.file_name().map_or_else(|| "app".to_owned(), |n| n.to_string_lossy().into_owned())
    }

    /// Python test files: `test_*.py` or `*_test.py`.
    fn python_tests(&self) -> Vec<&str> {
        self.ending_with(&[".py"])
            .filter(|path| {
                let name = file_name(path);
                name.starts_with("test_") || name.ends_with("_test.py")
            })
            .collect()
    }
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Which of the programs detection plans with are on `PATH`, and whether `pytest` imports.
#[derive(Debug, Clone, Default)]
pub(crate) struct Toolchains {
    programs: BTreeSet<String>,
    pub(crate) pytest: bool,
}

impl Toolchains {
    const PROGRAMS: [&'static str; 5] = ["python3", "node", "npm", "go", "cargo"];

    /// The programs found on this process's `PATH` (pytest not probed).
    pub(crate) fn from_path() -> Self {
        let programs =
            Self::PROGRAMS.iter().filter(|p| on_path(p)).map(|p| (*p).to_owned()).collect();
        Self { programs, pytest: false }
    }

    #[cfg(test)]
    pub(crate) fn only(programs: &[&str], pytest: bool) -> Self {
        Self { programs: programs.iter().map(|p| (*p).to_owned()).collect(), pytest }
    }

    fn has(&self, program: &str) -> bool {
        self.programs.contains(program)
    }
}

/// Whether the bare program name `program` is an executable file on `PATH`.
pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |path: &Path| {
        path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

/// How the project's tests are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TestPlan {
    /// A program and its arguments, run in the workspace.
    Command(Vec<String>),
    /// A static site: drover checks that every page's local links resolve.
    LocalLinks { root: String },
}

impl TestPlan {
    fn shown(&self) -> String {
        match self {
            Self::Command(argv) => format!("`{}`", shown(argv)),
            Self::LocalLinks { root } => format!("drover's check of the local links under {root}/"),
        }
    }
}

/// One validation step beyond drover's own checks of Python, JSON and HTML files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Validation {
    Run(Vec<String>),
    /// Not possible here, and why (a toolchain missing from `PATH`).
    Skipped(String),
}

/// What detection found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Detected {
    pub kind: Kind,
    pub name: String,
    /// The files that gave the kind away (and the entry point), as the log shows them.
    pub found: Vec<String>,
    pub start: Result<Vec<String>, String>,
    pub health_path: String,
    /// The file that mentions the health path (none: `/`, the default).
    pub health_from: Option<String>,
    pub checks: Vec<Check>,
    pub test: Result<TestPlan, String>,
    pub validation: Vec<Validation>,
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|part| (*part).to_owned()).collect()
}

/// A command as the log shows it.
pub(crate) fn shown(argv: &[String]) -> String {
    argv.iter()
        .map(|arg| {
            if arg.is_empty() || arg.contains(char::is_whitespace) {
                format!("'{arg}'")
            } else {
                arg.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the workspace holds, or why nothing could be detected (naming what was looked for
/// and what is there).
pub(crate) fn detect(ws: &Workspace, tools: &Toolchains) -> Result<Detected, String> {
    let detected = if ws.has("Cargo.toml") {
        cargo(ws, tools)
    } else if ws.has("go.mod") {
        go(ws, tools)
    } else if ws.has("package.json") {
        node(ws, tools)
    } else if let Some(found) = python_markers(ws) {
        python(ws, tools, found)
    } else if let Some(root) = static_root(ws) {
        static_site(ws, root)
    } else {
        let mut listed: Vec<&str> = ws.files.iter().take(10).map(String::as_str).collect();
        if ws.files.len() > listed.len() {
            listed.push("…");
        }
        let holds = if listed.is_empty() { "nothing".to_owned() } else { listed.join(", ") };
        return Err(format!(
            "no {MANIFEST_FILE}, and no project detected in the workspace: looked for \
             {LOOKED_FOR}; the workspace holds {holds}"
        ));
    };
    Ok(detected)
}

/// The first `"/health"` or `"/healthz"` (quoted, as a route is written) in the sources
/// ending with `suffixes`, and the file it is in.
fn health_path(ws: &Workspace, suffixes: &[&str]) -> (String, Option<String>) {
    for candidate in ["/health", "/healthz"] {
        for path in ws.ending_with(suffixes).take(MAX_SEARCHED_SOURCES) {
            let Some(text) = ws.read(path) else { continue };
            let quoted = text.match_indices(candidate).any(|(at, _)| {
                let before = text[..at].chars().next_back();
                let after = text[at + candidate.len()..].chars().next();
                matches!(before, Some('"' | '\'' | '`' | ' '))
                    && matches!(after, Some('"' | '\'' | '`'))
            });
            if quoted {
                return (candidate.to_owned(), Some(path.to_owned()));
            }
        }
    }
    ("/".to_owned(), None)
}

fn app_checks(health_path: &str) -> Vec<Check> {
    vec![Check { path: health_path.to_owned(), status: 200, contains: None }]
}

impl Detected {
    /// An app of `kind` named `name` that serves HTTP: its health path is the one its
    /// sources (ending with `sources`) mention, and is checked end to end. The rest is
    /// for the caller to say.
    fn app(ws: &Workspace, kind: Kind, name: String, sources: &[&str]) -> Self {
        let (health_path, health_from) = health_path(ws, sources);
        Self {
            kind,
            name,
            found: Vec::new(),
            start: Err("nothing to start".to_owned()),
            checks: app_checks(&health_path),
            health_path,
            health_from,
            test: Err("no tests".to_owned()),
            validation: Vec::new(),
        }
    }
}

fn missing_tool(program: &str, skipped: &str) -> Validation {
    Validation::Skipped(format!("{program} is not on PATH: {skipped} skipped"))
}

fn cargo(ws: &Workspace, tools: &Toolchains) -> Detected {
    let manifest = ws.read("Cargo.toml").unwrap_or_default();
    let name = toml_string(&manifest, "package", "name").unwrap_or_else(|| ws.dir_name());
    let has_tests = ws.ending_with(&[".rs"]).any(|path| {
        (path.starts_with("tests/") && !path["tests/".len()..].contains('/'))
            || ws.read(path).is_some_and(|text| text.contains("#[test]"))
    });
    Detected {
        found: vec!["Cargo.toml".to_owned()],
        start: Ok(argv(&["cargo", "run", "--quiet"])),
        test: if has_tests {
            Ok(TestPlan::Command(argv(&["cargo", "test"])))
        } else {
            Err("the Cargo project has no tests (no #[test] in its sources, no tests/*.rs)"
                .to_owned())
        },
        validation: vec![if tools.has("cargo") {
            Validation::Run(argv(&["cargo", "check", "--quiet"]))
        } else {
            missing_tool("cargo", "`cargo check`")
        }],
        ..Detected::app(ws, Kind::Cargo, name, &[".rs"])
    }
}

/// `key = "value"` in `[section]` of a TOML file (the one value detection needs from
/// `Cargo.toml` and `pyproject.toml`).
fn toml_string(text: &str, section: &str, key: &str) -> Option<String> {
    let header = format!("[{section}]");
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == header;
        } else if inside
            && let Some((name, value)) = line.split_once('=')
            && name.trim() == key
        {
            let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
            return (!value.is_empty()).then(|| value.to_owned());
        }
    }
    None
}

fn go(ws: &Workspace, tools: &Toolchains) -> Detected {
    let module = ws.read("go.mod").unwrap_or_default();
    let name = module
        .lines()
        .find_map(|line| line.trim().strip_prefix("module "))
        .and_then(|path| path.trim().rsplit('/').next().map(str::to_owned))
        .unwrap_or_else(|| ws.dir_name());
    let root_main = ws.ending_with(&[".go"]).any(|path| !path.contains('/'));
    let command_dir = ws
        .ending_with(&["/main.go"])
        .find(|path| path.starts_with("cmd/") && path.matches('/').count() == 2)
        .map(|path| format!("./{}", &path[..path.len() - "/main.go".len()]));
    let start = match (root_main, command_dir) {
        (true, _) => Ok(argv(&["go", "run", "."])),
        (false, Some(dir)) => Ok(vec!["go".to_owned(), "run".to_owned(), dir]),
        (false, None) => {
            Err("the Go module has no .go file at its root and no cmd/NAME/main.go".to_owned())
        }
    };
    let mut found = vec!["go.mod".to_owned()];
    if let Ok(start) = &start {
        found.extend(start.get(2).filter(|dir| dir.as_str() != ".").cloned());
    }
    Detected {
        found,
        start,
        test: if ws.ending_with(&["_test.go"]).next().is_some() {
            Ok(TestPlan::Command(argv(&["go", "test", "./..."])))
        } else {
            Err("the Go module has no *_test.go files".to_owned())
        },
        validation: vec![if tools.has("go") {
            Validation::Run(argv(&["go", "vet", "./..."]))
        } else {
            missing_tool("go", "`go vet ./...`")
        }],
        ..Detected::app(ws, Kind::Go, name, &[".go"])
    }
}

const NODE_SOURCES: [&str; 3] = [".js", ".mjs", ".cjs"];

fn node(ws: &Workspace, tools: &Toolchains) -> Detected {
    let package: Result<Value, String> = ws
        .read("package.json")
        .ok_or_else(|| "package.json cannot be read".to_owned())
        .and_then(|text| {
            serde_json::from_str(&text)
                .map_err(|err| format!("package.json is not valid JSON: {err}"))
        });
    let field = |name: &str| -> Option<String> {
        package.as_ref().ok()?.get(name)?.as_str().map(str::to_owned)
    };
    let script = |name: &str| -> Option<String> {
        package.as_ref().ok()?.get("scripts")?.get(name)?.as_str().map(str::to_owned)
    };
    let name = field("name").unwrap_or_else(|| ws.dir_name());
    let main = field("main").filter(|main| ws.has(main.trim_start_matches("./")));
    let entry = main.clone().or_else(|| {
        ws.first_of(&["server.js", "index.js", "app.js", "main.js", "server.mjs", "index.mjs"])
            .map(str::to_owned)
    });
    let mut found = vec!["package.json".to_owned()];
    let start = match (&package, script("start"), &entry) {
        (Err(why), _, _) => Err(why.clone()),
        (Ok(_), Some(_), _) => Ok(argv(&["npm", "start"])),
        (Ok(_), None, Some(entry)) => {
            found.push(entry.clone());
            Ok(vec!["node".to_owned(), entry.clone()])
        }
        (Ok(_), None, None) => Err("package.json has no `start` script nor a `main` file, and \
             there is no server.js, index.js, app.js or main.js"
            .to_owned()),
    };
    // `npm init` writes a test script that only fails: that is no test.
    let test_script = script("test").filter(|test| !test.contains("no test specified"));
    let test_files = ws.ending_with(&NODE_SOURCES).any(|path| {
        let name = file_name(path);
        path.starts_with("test/")
            || path.starts_with("tests/")
            || name.contains(".test.")
            || name.contains(".spec.")
    });
    let test = match (&package, test_script, test_files) {
        (Err(why), _, _) => Err(why.clone()),
        (Ok(_), Some(_), _) => Ok(TestPlan::Command(argv(&["npm", "test"]))),
        (Ok(_), None, true) => Ok(TestPlan::Command(argv(&["node", "--test"]))),
        (Ok(_), None, false) => Err("package.json has no `test` script and there are no test \
             files (test/*.js, tests/*.js, *.test.js, *.spec.js)"
            .to_owned()),
    };
    let validation = if tools.has("node") {
        ws.ending_with(&NODE_SOURCES)
            .take(MAX_NODE_CHECKS)
            .map(|path| {
                Validation::Run(vec!["node".to_owned(), "--check".to_owned(), path.to_owned()])
            })
            .collect()
    } else {
        vec![missing_tool("node", "`node --check` of the JavaScript sources")]
    };
    Detected {
        found,
        start,
        test,
        validation,
        ..Detected::app(ws, Kind::Node, name, &NODE_SOURCES)
    }
}

/// The files that make the workspace a Python project, if any do.
fn python_markers(ws: &Workspace) -> Option<Vec<String>> {
    let mut found: Vec<String> = ["requirements.txt", "pyproject.toml", "setup.py", "Pipfile"]
        .iter()
        .filter(|marker| ws.has(marker))
        .map(|marker| (*marker).to_owned())
        .collect();
    if found.is_empty() && ws.ending_with(&[".py"]).next().is_none() {
        return None;
    }
    found.extend(python_entry(ws).map(|(file, _)| file));
    if found.is_empty() {
        found.push("*.py files".to_owned());
    }
    Some(found)
}

/// The file that starts the app and the command that runs it.
fn python_entry(ws: &Workspace) -> Option<(String, Vec<String>)> {
    if let Some(file) = ws.first_of(&["app.py", "main.py", "server.py", "run.py", "__main__.py"]) {
        return Some((file.to_owned(), argv(&["python3", file])));
    }
    let package = ws.ending_with(&["/__main__.py"]).find(|path| path.matches('/').count() == 1)?;
    let module = &package[..package.len() - "/__main__.py".len()];
    Some((package.to_owned(), argv(&["python3", "-m", module])))
}

fn python(ws: &Workspace, tools: &Toolchains, found: Vec<String>) -> Detected {
    let name = ws
        .read("pyproject.toml")
        .and_then(|text| toml_string(&text, "project", "name"))
        .unwrap_or_else(|| ws.dir_name());
    let start = python_entry(ws).map(|(_, command)| command).ok_or_else(|| {
        "the Python project has no app.py, main.py, server.py, run.py, __main__.py or \
         PACKAGE/__main__.py to start"
            .to_owned()
    });
    let tests = ws.python_tests();
    let test = if tests.is_empty() {
        Err("the Python project has no tests (no test_*.py or *_test.py files)".to_owned())
    } else if tools.pytest {
        Ok(TestPlan::Command(argv(&["python3", "-m", "pytest", "-q"])))
    } else {
        let mut command = argv(&["python3", "-m", "unittest", "discover"]);
        if tests.iter().all(|path| path.starts_with("tests/")) {
            command.extend(argv(&["-s", "tests"]));
        }
        if !tests.iter().any(|path| file_name(path).starts_with("test")) {
            command.extend(argv(&["-p", "*_test.py"]));
        }
        Ok(TestPlan::Command(command))
    };
    Detected {
        found,
        start,
        test,
        // drover's own validation byte-compiles every Python file.
        validation: Vec::new(),
        ..Detected::app(ws, Kind::Python, name, &[".py"])
    }
}

/// The directory a static site is served from (`.` for the workspace itself).
fn static_root(ws: &Workspace) -> Option<&'static str> {
    [".", "public", "site", "www", "dist", "docs", "build"].into_iter().find(|dir| {
        ws.has(&if *dir == "." { "index.html".to_owned() } else { format!("{dir}/index.html") })
    })
}

fn static_site(ws: &Workspace, root: &'static str) -> Detected {
    let prefix = if root == "." { String::new() } else { format!("{root}/") };
    let pages: Vec<Check> = ws
        .ending_with(&[".html"])
        .filter_map(|path| path.strip_prefix(prefix.as_str()))
        .filter(|page| *page != "index.html")
        .take(MAX_PAGE_CHECKS)
        .map(|page| Check { path: format!("/{page}"), status: 200, contains: None })
        .collect();
    let mut checks = vec![Check { path: "/".to_owned(), status: 200, contains: None }];
    checks.extend(pages);
    Detected {
        kind: Kind::Static,
        name: ws.dir_name(),
        found: vec![format!("{prefix}index.html")],
        // Served by drover itself: Python's standard-library file server, on `PORT`.
        start: Ok(argv(&[
            "python3",
            "-m",
            "http.server",
            "$PORT",
            "--bind",
            "127.0.0.1",
            "--directory",
            root,
        ])),
        health_path: "/".to_owned(),
        health_from: None,
        checks,
        test: Ok(TestPlan::LocalLinks { root: root.to_owned() }),
        validation: Vec::new(),
    }
}

/// Where the project's description came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Manifest,
    Detected,
    /// A manifest that left keys out, completed by detection.
    Completed,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Self::Manifest => "drover.json",
            Self::Detected => "detected",
            Self::Completed => "drover.json + detection",
        }
    }
}

/// The project as the built-in stages work on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Project {
    pub name: String,
    /// The detected kind, also with a manifest (it says which toolchain validates).
    pub kind: Option<Kind>,
    pub source: Source,
    pub start: Result<Vec<String>, String>,
    pub health_path: String,
    pub checks: Vec<Check>,
    pub test: Result<TestPlan, String>,
    pub validation: Vec<Validation>,
    /// One line saying what the stage works on and where that came from.
    pub description: String,
}

impl Project {
    /// The command that starts the app, or a failure saying why there is none.
    pub(crate) fn start(&self) -> Result<&[String], AgentFailure> {
        self.start
            .as_deref()
            .map_err(|why| AgentFailure::permanent(format!("cannot start the app: {why}")))
    }

    /// How the tests are run, or a failure saying why they cannot be.
    pub(crate) fn test(&self) -> Result<&TestPlan, AgentFailure> {
        self.test
            .as_ref()
            .map_err(|why| AgentFailure::permanent(format!("cannot run the tests: {why}")))
    }

    /// What the stage's result says about the project.
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "kind": self.kind.map(Kind::slug),
            "source": self.source.as_str(),
            "description": self.description,
        })
    }
}

/// The project from a manifest (if the workspace has one) and detection: a manifest always
/// wins, and the keys it leaves out come from detection. Fails only when there is neither.
pub(crate) fn combine(
    manifest: Option<ManifestFile>,
    detected: Result<Detected, String>,
) -> Result<Project, String> {
    let Some(manifest) = manifest else {
        let detected = detected?;
        let description = format!(
            "detected {} ({}): {}",
            detected.kind.described(),
            detected.found.join(", "),
            what_it_runs(
                &detected.start,
                &detected.health_path,
                detected.health_from.as_deref(),
                &detected.test
            )
        );
        return Ok(Project {
            name: detected.name,
            kind: Some(detected.kind),
            source: Source::Detected,
            start: detected.start,
            health_path: detected.health_path,
            checks: detected.checks,
            test: detected.test,
            validation: detected.validation,
            description,
        });
    };
    let missing = manifest.missing_keys();
    let detected_kind = detected.as_ref().ok().map(|d| d.kind);
    let validation = detected.as_ref().map(|d| d.validation.clone()).unwrap_or_default();
    // What detection would say for a key the manifest leaves out.
    let (d_name, d_start, d_health, d_checks, d_test) = match detected {
        Ok(d) => (d.name, d.start, (d.health_path, d.health_from), d.checks, d.test),
        Err(why) => (
            "app".to_owned(),
            Err(format!(
                "{MANIFEST_FILE} has no `start`, and detection found nothing to start: {why}"
            )),
            ("/".to_owned(), None),
            Vec::new(),
            Err(format!("{MANIFEST_FILE} has no `test`, and detection found no tests: {why}")),
        ),
    };
    let start_detected = manifest.start.is_none();
    let start = manifest.start.map_or(d_start, Ok);
    let (health_path, health_from) = match manifest.health_path {
        Some(path) => (path, Some(MANIFEST_FILE.to_owned())),
        None => d_health,
    };
    let checks = match manifest.checks {
        Some(checks) => checks,
        None if start_detected => d_checks,
        None => Vec::new(),
    };
    let test = manifest.test.map_or(d_test, |argv| Ok(TestPlan::Command(argv)));
    let runs = what_it_runs(&start, &health_path, health_from.as_deref(), &test);
    let (source, description) = if missing.is_empty() {
        (Source::Manifest, format!("{MANIFEST_FILE}: {runs}"))
    } else {
        let keys: Vec<String> = missing.iter().map(|key| format!("`{key}`")).collect();
        let by = match detected_kind {
            Some(kind) => format!("completed by detection ({})", kind.described()),
            None => "nothing detected to complete it".to_owned(),
        };
        (Source::Completed, format!("{MANIFEST_FILE} without {}, {by}: {runs}", keys.join(", ")))
    };
    Ok(Project {
        name: manifest.name.unwrap_or(d_name),
        kind: detected_kind,
        source,
        start,
        health_path,
        checks,
        test,
        validation,
        description,
    })
}

/// `start `python3 app.py`, health `/health` (in app.py), test `…``.
fn what_it_runs(
    start: &Result<Vec<String>, String>,
    health_path: &str,
    health_from: Option<&str>,
    test: &Result<TestPlan, String>,
) -> String {
    let start = match start {
        Ok(argv) => format!("start `{}`", shown(argv)),
        Err(_) => "nothing to start".to_owned(),
    };
    let health = match health_from {
        Some(file) if file != MANIFEST_FILE => format!("health `{health_path}` (found in {file})"),
        Some(_) => format!("health `{health_path}`"),
        None => format!("health `{health_path}` (the default)"),
    };
    let test = match test {
        Ok(plan) => format!("test {}", plan.shown()),
        Err(_) => "no tests".to_owned(),
    };
    format!("{start}, {health}, {test}")
}

/// The project in `workspace`: reads its manifest (an invalid one fails), lists its files,
/// looks at `PATH` (and whether `pytest` imports, for a Python project with tests), then
/// [`detect`] and [`combine`]. A failure names what was looked for.
pub(crate) async fn resolve(workspace: &Path) -> Result<Project, AgentFailure> {
    let manifest = ManifestFile::load(workspace)
        .await
        .map_err(|err| AgentFailure::permanent(err.to_string()))?;
    let root = workspace.to_path_buf();
    let (ws, mut tools) =
        tokio::task::spawn_blocking(move || (Workspace::scan(&root), Toolchains::from_path()))
            .await
            .map_err(|err| {
                AgentFailure::transient(format!("cannot look at the workspace: {err}"))
            })?;
    if !ws.python_tests().is_empty() && tools.has("python3") {
        tools.pytest = pytest_imports(workspace).await;
    }
    combine(manifest, detect(&ws, &tools)).map_err(AgentFailure::permanent)
}

async fn pytest_imports(workspace: &Path) -> bool {
    tokio::process::Command::new("python3")
        .args(["-c", "import pytest"])
        .current_dir(workspace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .is_ok_and(|status| status.success())
}

/// A failure if `argv`'s program is a bare name not on `PATH`, naming it and what needed
/// it. A path (`./serve`, relative to the workspace the command runs in) is left to the
/// start, which names it if it is not there.
pub(crate) fn require_program(argv: &[String], what: &str) -> Result<(), AgentFailure> {
    match argv.first() {
        Some(program) if !program.contains('/') && !on_path(program) => {
            Err(AgentFailure::permanent(format!(
                "`{program}` is not on PATH (or not executable): it is needed to {what} (`{}`)",
                shown(argv)
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workspace(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("hello");
        std::fs::create_dir(&root).unwrap();
        for (path, text) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        (dir, root)
    }

    fn detected(files: &[(&str, &str)], tools: &Toolchains) -> Result<Detected, String> {
        let (_dir, root) = workspace(files);
        detect(&Workspace::scan(&root), tools)
    }

    fn all_tools() -> Toolchains {
        Toolchains::only(&["python3", "node", "npm", "go", "cargo"], false)
    }

    fn command(plan: &Result<TestPlan, String>) -> Vec<String> {
        match plan {
            Ok(TestPlan::Command(argv)) => argv.clone(),
            other => panic!("not a command: {other:?}"),
        }
    }

    const PY_APP: &str = "import os\nPORT = int(os.environ['PORT'])\nif path == '/health': pass\n";

    #[test]
    fn a_python_project_starts_its_app_and_tests_with_pytest_when_it_imports() {
        let files = [("app.py", PY_APP), ("requirements.txt", ""), ("tests/test_app.py", "")];
        let with_pytest = detected(&files, &Toolchains::only(&["python3"], true)).unwrap();
        assert_eq!(with_pytest.kind, Kind::Python);
        assert_eq!(with_pytest.start, Ok(argv(&["python3", "app.py"])));
        assert_eq!(command(&with_pytest.test), ["python3", "-m", "pytest", "-q"]);
        assert_eq!(with_pytest.health_path, "/health");
        assert_eq!(with_pytest.health_from.as_deref(), Some("app.py"));
        assert_eq!(with_pytest.found, ["requirements.txt", "app.py"]);
        assert_eq!(with_pytest.name, "hello", "named after its directory");

        let without = detected(&files, &Toolchains::only(&["python3"], false)).unwrap();
        assert_eq!(
            command(&without.test),
            ["python3", "-m", "unittest", "discover", "-s", "tests"]
        );
    }

    #[test]
    fn python_tests_beside_the_code_or_named_after_it_are_discovered() {
        let beside =
            detected(&[("main.py", "x = 1\n"), ("test_main.py", "")], &all_tools()).unwrap();
        assert_eq!(beside.start, Ok(argv(&["python3", "main.py"])));
        assert_eq!(command(&beside.test), ["python3", "-m", "unittest", "discover"]);
        assert_eq!(beside.health_path, "/", "no health route in the sources");

        let suffixed =
            detected(&[("server.py", ""), ("server_test.py", "")], &all_tools()).unwrap();
        assert_eq!(
            command(&suffixed.test),
            ["python3", "-m", "unittest", "discover", "-p", "*_test.py"]
        );

        let package = detected(
            &[("pyproject.toml", "[project]\nname = \"greeter\"\n"), ("greeter/__main__.py", "")],
            &all_tools(),
        )
        .unwrap();
        assert_eq!(package.start, Ok(argv(&["python3", "-m", "greeter"])));
        assert_eq!(package.name, "greeter");
        assert!(package.test.unwrap_err().contains("no test_*.py"));

        let no_entry =
            detected(&[("requirements.txt", "flask\n"), ("lib/util.py", "")], &all_tools())
                .unwrap();
        let why = no_entry.start.unwrap_err();
        assert!(why.contains("app.py, main.py, server.py"), "{why}");
    }

    #[test]
    fn a_node_project_runs_its_package_scripts_with_npm() {
        let package =
            r#"{"name": "hi-node", "scripts": {"start": "node server.js", "test": "node --test"}}"#;
        let node = detected(
            &[
                ("package.json", package),
                ("server.js", "app.get(\"/healthz\", ok)\n"),
                ("lib/x.mjs", ""),
            ],
            &all_tools(),
        )
        .unwrap();
        assert_eq!(node.kind, Kind::Node);
        assert_eq!(node.name, "hi-node");
        assert_eq!(node.start, Ok(argv(&["npm", "start"])));
        assert_eq!(command(&node.test), ["npm", "test"]);
        assert_eq!(node.health_path, "/healthz");
        assert_eq!(
            node.validation,
            [
                Validation::Run(argv(&["node", "--check", "lib/x.mjs"])),
                Validation::Run(argv(&["node", "--check", "server.js"]))
            ]
        );

        // No scripts: the main file runs with node, test files with node's own runner; the
        // placeholder test script `npm init` writes is no test.
        let bare = detected(
            &[
                ("package.json", r#"{"main": "src/app.js", "scripts": {"test": "echo \"Error: no test specified\" && exit 1"}}"#),
                ("src/app.js", ""),
                ("test/app.test.js", ""),
            ],
            &Toolchains::only(&["python3"], false),
        )
        .unwrap();
        assert_eq!(bare.start, Ok(argv(&["node", "src/app.js"])));
        assert_eq!(command(&bare.test), ["node", "--test"]);
        assert_eq!(
            bare.validation,
            [Validation::Skipped(
                "node is not on PATH: `node --check` of the JavaScript sources skipped".into()
            )]
        );

        let nothing = detected(&[("package.json", "{}")], &all_tools()).unwrap();
        assert!(nothing.start.unwrap_err().contains("no `start` script"));
        assert!(nothing.test.unwrap_err().contains("no `test` script"));
        let broken = detected(&[("package.json", "{nope")], &all_tools()).unwrap();
        assert!(broken.start.unwrap_err().contains("package.json is not valid JSON"));
    }

    #[test]
    fn a_go_module_runs_with_go_and_is_vetted_only_where_go_is_installed() {
        let files = [
            ("go.mod", "module example.com/me/hello-go\n\ngo 1.22\n"),
            ("main.go", "package main\n// mux.HandleFunc(\"GET /health\", h)\n"),
            ("main_test.go", "package main\n"),
        ];
        let go = detected(&files, &all_tools()).unwrap();
        assert_eq!(go.kind, Kind::Go);
        assert_eq!(go.name, "hello-go");
        assert_eq!(go.start, Ok(argv(&["go", "run", "."])));
        assert_eq!(command(&go.test), ["go", "test", "./..."]);
        assert_eq!(go.health_path, "/health");
        assert_eq!(go.validation, [Validation::Run(argv(&["go", "vet", "./..."]))]);
        let without_go = detected(&files, &Toolchains::only(&["python3"], false)).unwrap();
        assert_eq!(
            without_go.validation,
            [Validation::Skipped("go is not on PATH: `go vet ./...` skipped".into())]
        );

        let cmd =
            detected(&[("go.mod", "module x\n"), ("cmd/api/main.go", "")], &all_tools()).unwrap();
        assert_eq!(cmd.start, Ok(argv(&["go", "run", "./cmd/api"])));
        assert!(cmd.test.unwrap_err().contains("_test.go"));
    }

    #[test]
    fn a_cargo_project_runs_with_cargo() {
        let files = [
            (
                "Cargo.toml",
                "[package]\nname = \"hello-rs\"\nversion = \"0.1.0\"\n\n[dependencies]\nname = \"no\"\n",
            ),
            ("src/main.rs", "fn main() {}\n#[cfg(test)] mod t { #[test] fn ok() {} }\n"),
        ];
        let cargo = detected(&files, &all_tools()).unwrap();
        assert_eq!(cargo.kind, Kind::Cargo);
        assert_eq!(cargo.name, "hello-rs");
        assert_eq!(cargo.start, Ok(argv(&["cargo", "run", "--quiet"])));
        assert_eq!(command(&cargo.test), ["cargo", "test"]);
        assert_eq!(cargo.validation, [Validation::Run(argv(&["cargo", "check", "--quiet"]))]);
        let untested = detected(
            &[("Cargo.toml", "[package]\nname = \"x\"\n"), ("src/main.rs", "fn main() {}\n")],
            &Toolchains::default(),
        )
        .unwrap();
        assert!(untested.test.unwrap_err().contains("no tests"));
        assert!(
            matches!(&untested.validation[0], Validation::Skipped(why) if why.contains("cargo is not on PATH"))
        );
    }

    #[test]
    fn a_static_site_is_served_by_drover_with_every_page_checked() {
        let site = detected(
            &[
                ("public/index.html", "<h1>hi</h1>"),
                ("public/about.html", ""),
                ("public/style.css", ""),
                ("README.md", ""),
            ],
            &all_tools(),
        )
        .unwrap();
        assert_eq!(site.kind, Kind::Static);
        assert_eq!(
            shown(site.start.as_deref().unwrap()),
            "python3 -m http.server $PORT --bind 127.0.0.1 --directory public"
        );
        assert_eq!(site.health_path, "/");
        let paths: Vec<&str> = site.checks.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/", "/about.html"]);
        assert_eq!(site.test, Ok(TestPlan::LocalLinks { root: "public".into() }));
        let at_root = detected(&[("index.html", "")], &all_tools()).unwrap();
        assert_eq!(at_root.found, ["index.html"]);
        assert!(at_root.start.unwrap().ends_with(&["--directory".to_owned(), ".".to_owned()]));
    }

    #[test]
    fn an_undetectable_workspace_says_what_was_looked_for_and_what_is_there() {
        let why =
            detected(&[("notes.txt", "ideas"), ("data/x.csv", "")], &all_tools()).unwrap_err();
        for looked_for in [
            "drover.json",
            "Cargo.toml",
            "go.mod",
            "package.json",
            "requirements.txt",
            "pyproject.toml",
            "index.html",
        ] {
            assert!(why.contains(looked_for), "{looked_for}: {why}");
        }
        assert!(why.ends_with("the workspace holds data/x.csv, notes.txt"), "{why}");
        let empty = detected(&[], &all_tools()).unwrap_err();
        assert!(empty.ends_with("the workspace holds nothing"), "{empty}");
    }

    #[test]
    fn a_manifest_wins_and_a_partial_one_is_completed_by_detection() {
        let (_dir, root) = workspace(&[("app.py", PY_APP), ("test_app.py", "")]);
        let ws = Workspace::scan(&root);
        let tools = Toolchains::only(&["python3"], false);

        let full = ManifestFile::parse(r#"{"name":"m","start":["python3","serve.py"],"health_path":"/up","test":["make","test"]}"#).unwrap();
        let project = combine(Some(full), detect(&ws, &tools)).unwrap();
        assert_eq!(project.source, Source::Manifest);
        assert_eq!(project.start, Ok(argv(&["python3", "serve.py"])));
        assert_eq!(project.health_path, "/up");
        assert!(project.checks.is_empty(), "the manifest's (absent) checks, not detection's");
        assert_eq!(project.test, Ok(TestPlan::Command(argv(&["make", "test"]))));
        assert_eq!(project.kind, Some(Kind::Python), "the kind still says how to validate");
        assert_eq!(
            project.description,
            "drover.json: start `python3 serve.py`, health `/up`, test `make test`"
        );

        let partial = ManifestFile::parse(r#"{"start":["python3","app.py"]}"#).unwrap();
        let project = combine(Some(partial), detect(&ws, &tools)).unwrap();
        assert_eq!(project.source, Source::Completed);
        assert_eq!(project.name, "hello");
        assert_eq!(project.health_path, "/health");
        assert_eq!(
            project.test,
            Ok(TestPlan::Command(argv(&["python3", "-m", "unittest", "discover"])))
        );
        assert_eq!(
            project.description,
            "drover.json without `name`, `health_path`, `test`, completed by detection (a Python \
             project): start `python3 app.py`, health `/health` (found in app.py), test \
             `python3 -m unittest discover`"
        );

        let detected_only = combine(None, detect(&ws, &tools)).unwrap();
        assert_eq!(detected_only.source, Source::Detected);
        assert_eq!(detected_only.checks, app_checks("/health"));
        assert!(
            detected_only
                .description
                .starts_with("detected a Python project (app.py): start `python3 app.py`"),
            "{}",
            detected_only.description
        );
    }

    #[test]
    fn a_partial_manifest_with_nothing_detected_names_what_is_missing() {
        let (_dir, root) = workspace(&[("notes.txt", "")]);
        let ws = Workspace::scan(&root);
        let partial =
            ManifestFile::parse(r#"{"name":"x","start":["./serve"],"health_path":"/"}"#).unwrap();
        let project = combine(Some(partial), detect(&ws, &Toolchains::default())).unwrap();
        assert!(project.start.is_ok());
        let why = project.test().unwrap_err().message;
        assert!(why.starts_with("cannot run the tests: drover.json has no `test`, and detection found no tests: no drover.json"), "{why}");
        assert!(
            project.description.contains("nothing detected to complete it"),
            "{}",
            project.description
        );
        assert!(combine(None, detect(&ws, &Toolchains::default())).is_err());
    }

    #[test]
    fn a_program_missing_from_path_is_named_with_what_needed_it() {
        assert!(require_program(&argv(&["python3", "app.py"]), "start the app").is_ok());
        assert!(require_program(&argv(&["./serve"]), "start the app").is_ok(), "a path");
        let err =
            require_program(&argv(&["no-such-tool-here", "run"]), "start the app").unwrap_err();
        assert_eq!(
            err.message,
            "`no-such-tool-here` is not on PATH (or not executable): it is needed to start the app (`no-such-tool-here run`)"
        );
        assert!(!err.retryable);
    }

    #[test]
    fn toml_values_are_read_from_their_own_section() {
        let text = "[workspace]\nname = \"w\"\n[package]\nversion = \"1\"\nname = 'pkg'\n";
        assert_eq!(toml_string(text, "package", "name").as_deref(), Some("pkg"));
        assert_eq!(toml_string(text, "project", "name"), None);
    }
}
