//! The README's reference table is the CLI's and the config file's: every `run` flag, its
//! environment variable and its TOML key are documented, nothing documented is missing from
//! the CLI or the config file, and the modes a flag applies to are named alike in both; the
//! same for the `token` command's flags; and every test the capability table names exists.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use support::daemon::command;

fn run_help() -> String {
    let output = command(None).args(["run", "--help"]).output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

/// Each flag with the first line of its description.
fn cli_flags(help: &str) -> BTreeMap<String, String> {
    let mut flags = BTreeMap::new();
    let mut lines = help.lines().map(str::trim).filter(|line| !line.is_empty());
    while let Some(line) = lines.next() {
        if let Some(flag) = line.strip_prefix("--") {
            let name = flag.split([' ', '<']).next().unwrap();
            if name != "help" {
                let about = lines.next().unwrap_or_default().to_owned();
                flags.insert(format!("--{name}"), about);
            }
        }
    }
    flags
}

fn cli_env(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("[env: "))
        .map(|rest| rest.split('=').next().unwrap().to_owned())
        .collect()
}

struct Row {
    flag: String,
    env: Vec<String>,
    toml: Vec<String>,
    meaning: String,
}

fn readme_table() -> Vec<Row> {
    let readme = std::fs::read_to_string(support::repo_root().join("README.md")).unwrap();
    let table = readme
        .split("| flag | environment | TOML key | default | meaning |")
        .nth(1)
        .expect("README has the reference table");
    let list = |cell: &str| -> Vec<String> {
        cell.split(',')
            .map(|item| item.trim().trim_matches('`').to_owned())
            .filter(|item| !item.is_empty())
            .collect()
    };
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            Row {
                flag: cells[1].trim_matches('`').to_owned(),
                env: list(cells[2]),
                toml: list(cells[3]),
                meaning: cells[5].to_owned(),
            }
        })
        .collect()
}

/// The keys the daemon's config file accepts, from its own refusal of an unknown one
/// ("unknown field `x`, expected one of `a`, `b`, ...").
fn accepted_keys(toml: &str) -> BTreeSet<String> {
    let dir = support::test_dir("toml-keys");
    let file = dir.path().join("probe.toml");
    std::fs::write(&file, toml).unwrap();
    let output = command(None)
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    let expected = stderr
        .lines()
        .find_map(|line| line.split_once("expected one of ").map(|(_, keys)| keys))
        .unwrap_or_else(|| panic!("no list of accepted keys: {stderr}"));
    expected
        .split(',')
        .map(|key| key.trim().trim_matches('`').to_owned())
        .collect()
}

/// "Auth-query and passthrough modes" from "Auth-query and passthrough modes: ...".
fn modes_named(text: &str) -> Option<String> {
    let (before, _) = text.split_once(':')?;
    (before.ends_with(" mode") || before.ends_with(" modes")).then(|| before.to_lowercase())
}

#[test]
fn the_readme_documents_every_run_flag_and_nothing_else() {
    let help = run_help();
    let cli_flags = cli_flags(&help);
    let rows = readme_table();
    assert!(
        cli_flags.len() > 10,
        "parsing --help found too little: {cli_flags:?}"
    );
    let readme_flags: BTreeSet<&String> = rows.iter().map(|row| &row.flag).collect();
    assert_eq!(
        readme_flags,
        cli_flags.keys().collect(),
        "README flags vs `run --help`"
    );
    let readme_env: BTreeSet<String> = rows
        .iter()
        .flat_map(|row| row.env.iter())
        .filter(|name| name.starts_with("AWS_PGBOUNCER_"))
        .cloned()
        .collect();
    assert_eq!(
        readme_env,
        cli_env(&help),
        "README environment variables vs `run --help`"
    );
}

#[test]
fn the_readme_names_the_modes_a_flag_applies_to_as_help_does() {
    let cli_flags = cli_flags(&run_help());
    let mut checked = 0;
    for row in readme_table() {
        let help = &cli_flags[&row.flag];
        assert_eq!(
            modes_named(&row.meaning),
            modes_named(help),
            "{}: README says {:?}, --help says {help:?}",
            row.flag,
            row.meaning
        );
        checked += usize::from(modes_named(help).is_some());
    }
    assert!(checked >= 4, "only {checked} flags name their modes");
}

#[test]
fn the_readme_toml_keys_are_the_config_files() {
    let rows = readme_table();
    let documented = |prefix: &str| -> BTreeSet<String> {
        rows.iter()
            .flat_map(|row| row.toml.iter())
            .filter_map(|key| match key.strip_prefix("[[databases]] ") {
                Some(key) => (prefix == "[[databases]]").then(|| key.to_owned()),
                None => prefix.is_empty().then(|| key.clone()),
            })
            .collect()
    };
    // Top level: every scalar setting the file accepts has a row (the tables have their own
    // sections), and every documented key is accepted.
    let mut top = accepted_keys("not_a_setting = 1\n");
    for table in ["databases", "clients", "pgbouncer"] {
        assert!(top.remove(table), "{table} missing from {top:?}");
    }
    assert_eq!(documented(""), top, "README's TOML keys vs the config file");
    // Per database: the documented keys exist; the others (name, options) are not flags.
    let per_database = accepted_keys("[[databases]]\nnot_a_setting = 1\n");
    let in_readme = documented("[[databases]]");
    assert!(in_readme.len() >= 5, "{in_readme:?}");
    assert!(
        in_readme.is_subset(&per_database),
        "README's [[databases]] keys {in_readme:?} vs the config file's {per_database:?}"
    );
}

#[test]
fn the_readme_documents_every_token_flag_and_nothing_else() {
    let output = command(None).args(["token", "--help"]).output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let cli: BTreeSet<String> = cli_flags(&help).into_keys().collect();
    let readme = std::fs::read_to_string(support::repo_root().join("README.md")).unwrap();
    let table = readme
        .split("| `token` flag | default | meaning |")
        .nth(1)
        .expect("README has the token flags' table");
    let documented: BTreeSet<String> = table
        .lines()
        .skip(2)
        .map(str::trim)
        .take_while(|line| line.starts_with('|'))
        .map(|row| {
            row.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_owned()
        })
        .collect();
    assert!(
        cli.len() >= 6,
        "parsing token --help found too little: {cli:?}"
    );
    assert_eq!(documented, cli, "README's token flags vs `token --help`");
}

#[test]
fn the_readme_documents_every_command() {
    let output = command(None).arg("--help").output().unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert!(commands.len() >= 5, "{commands:?}");
    let readme = std::fs::read_to_string(support::repo_root().join("README.md")).unwrap();
    for name in commands {
        assert!(
            readme.contains(&format!("`aws-pgbouncer {name}")),
            "README does not show `aws-pgbouncer {name} ...`"
        );
    }
}

/// The capability table names tests as `path::function` (or a script by its path); a renamed or
/// deleted test would leave a capability claimed by nothing, so every name must resolve.
#[test]
fn every_test_the_capability_table_names_exists() {
    let root = support::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let table = readme
        .split("| capability | proved by |")
        .nth(1)
        .expect("README has the capability table")
        .split("\n\n")
        .next()
        .unwrap();
    let mut named = 0;
    let mut missing = Vec::new();
    for cell in table.lines().filter_map(|row| row.rsplit('|').nth(1)) {
        for name in cell.split('`').skip(1).step_by(2) {
            let (path, function) = name.split_once("::").unwrap_or((name, ""));
            if !(path.starts_with("tests/")
                || path.starts_with("src/")
                || path.starts_with("scripts/"))
            {
                continue;
            }
            named += 1;
            let source = std::fs::read_to_string(root.join(path)).unwrap_or_default();
            let defined = if function.is_empty() {
                !source.is_empty()
            } else {
                source.contains(&format!("fn {function}("))
            };
            if !defined {
                missing.push(name.to_owned());
            }
        }
    }
    assert!(named >= 40, "the table names {named} tests; is it parsed?");
    assert!(
        missing.is_empty(),
        "the capability table names what does not exist: {missing:?}"
    );
}
