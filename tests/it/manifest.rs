//! Cargo.toml as the build-time budget wants it: no dependency feature that nothing uses, and
//! no dev-dependency that only repeats a normal one (the tests already have those).

/// The `name = …` lines of `[section]` in Cargo.toml, as (name, the rest of the line).
fn entries(manifest: &str, section: &str) -> Vec<(String, String)> {
    let header = format!("[{section}]");
    manifest
        .lines()
        .skip_while(|line| line.trim() != header)
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| {
            let (name, rest) = line.split_once('=')?;
            Some((name.trim().to_owned(), rest.trim().to_owned()))
        })
        .collect()
}

#[test]
fn dev_dependencies_add_only_what_the_tests_need() {
    let manifest = include_str!("../../Cargo.toml");
    let normal = entries(manifest, "dependencies");
    assert!(normal.len() > 10, "the [dependencies] section was read: {normal:?}");
    for (name, spec) in entries(manifest, "dev-dependencies") {
        if normal.iter().any(|(normal, _)| *normal == name) {
            assert!(
                spec.contains("features"),
                "dev-dependency {name} repeats a normal dependency without adding a feature"
            );
        }
    }
    let (_, tracing) =
        normal.iter().find(|(name, _)| name == "tracing").expect("tracing is a dependency");
    assert!(
        tracing.contains("default-features = false") && !tracing.contains("attributes"),
        "tracing without its unused `attributes` feature: {tracing}"
    );
}
