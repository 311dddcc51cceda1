//! The built-in template catalog the offline scaffold agent picks from.
//!
//! Templates are real projects kept under `templates/` in this crate and compiled into the
//! binary, so `drover run` works with no network and no configuration. Each one is a
//! Python 3 standard-library HTTP server that reads `PORT`, answers `GET /health`, ships
//! its own unittest suite, and describes itself in a `drover.json` manifest.

/// A project template.
#[derive(Debug, Clone, Copy)]
pub struct Template {
    pub slug: &'static str,
    pub name: &'static str,
    pub description: &'static str,
    /// Words in a request that point at this template, with their weights.
    keywords: &'static [(&'static str, u32)],
    /// Relative path and contents of every file.
    pub files: &'static [(&'static str, &'static str)],
}

macro_rules! template_files {
    ($slug:literal: $($path:literal),+ $(,)?) => {
        &[$(($path, include_str!(concat!("../templates/", $slug, "/", $path)))),+]
    };
}

const CATALOG: &[Template] = &[
    Template {
        slug: "hello-world-api",
        name: "Hello World API",
        description: "JSON API answering GET / with Hello, World and GET /health",
        keywords: &[("hello", 2), ("world", 2), ("greeting", 2), ("api", 1), ("json", 1)],
        files: template_files!("hello-world-api":
            "app.py", "tests/__init__.py", "tests/test_app.py", "README.md", "drover.json"),
    },
    Template {
        slug: "todo-api",
        name: "Todo API",
        description: "JSON CRUD API for a todo list kept in memory",
        keywords: &[("todo", 3), ("todos", 3), ("tasks", 2), ("crud", 2), ("api", 1)],
        files: template_files!("todo-api":
            "app.py", "tests/__init__.py", "tests/test_app.py", "README.md", "drover.json"),
    },
    Template {
        slug: "static-site",
        name: "Static Site",
        description: "static website (HTML and CSS) served over HTTP",
        keywords: &[
            ("static", 3),
            ("website", 3),
            ("site", 2),
            ("landing", 2),
            ("html", 2),
            ("page", 1),
        ],
        files: template_files!("static-site":
            "app.py", "public/index.html", "public/style.css", "tests/__init__.py",
            "tests/test_site.py", "README.md", "drover.json"),
    },
];

/// Every template, in catalog order; the first is the default.
pub fn catalog() -> &'static [Template] {
    CATALOG
}

/// Which template a request chose, and why.
#[derive(Debug, Clone, Copy)]
pub struct Selection {
    pub template: &'static Template,
    pub matched: bool,
}

/// Picks the template whose keywords best match the request's words. Ties go to the
/// earlier template; a request matching nothing gets the first (Hello World API).
pub fn select(request: &str) -> Selection {
    let words: Vec<String> = request
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let score = |template: &Template| -> u32 {
        template
            .keywords
            .iter()
            .filter(|(keyword, _)| words.iter().any(|w| w == keyword))
            .map(|(_, weight)| weight)
            .sum()
    };
    let mut best = (&CATALOG[0], 0);
    for template in CATALOG {
        let points = score(template);
        if points > best.1 {
            best = (template, points);
        }
    }
    Selection { template: best.0, matched: best.1 > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_names_resolve_to_their_own_templates() {
        for template in catalog() {
            let selection = select(template.name);
            assert_eq!(selection.template.slug, template.slug);
            assert!(selection.matched);
        }
    }

    #[test]
    fn requests_in_other_words_pick_by_keyword() {
        assert_eq!(select("build me a landing page website").template.slug, "static-site");
        assert_eq!(select("a CRUD service for my todos").template.slug, "todo-api");
        assert_eq!(select("say hello").template.slug, "hello-world-api");
    }

    #[test]
    fn an_unmatched_request_falls_back_to_hello_world() {
        let selection = select("quantum blockchain");
        assert_eq!(selection.template.slug, "hello-world-api");
        assert!(!selection.matched);
    }

    #[test]
    fn every_template_has_an_app_tests_and_a_manifest() {
        for template in catalog() {
            let paths: Vec<_> = template.files.iter().map(|(p, _)| *p).collect();
            assert!(paths.contains(&"app.py"), "{}", template.slug);
            assert!(paths.contains(&"drover.json"), "{}", template.slug);
            assert!(paths.iter().any(|p| p.starts_with("tests/test_")), "{}", template.slug);
        }
    }
}
