//! The README's reference table is the CLI's: every `run` flag and its environment variable
//! are documented, and nothing documented is missing from the CLI.

mod support;

use std::collections::BTreeSet;
use support::daemon::command;

fn run_help() -> String {
    let output = command(None).args(["run", "--help"]).output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

fn cli_flags_and_env(help: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut flags = BTreeSet::new();
    let mut env = BTreeSet::new();
    for line in help.lines().map(str::trim) {
        if let Some(flag) = line.strip_prefix("--") {
            let name = flag.split([' ', '<']).next().unwrap();
            if name != "help" {
                flags.insert(format!("--{name}"));
            }
        }
        if let Some(rest) = line.strip_prefix("[env: ") {
            env.insert(rest.split('=').next().unwrap().to_owned());
        }
    }
    (flags, env)
}

fn readme_table() -> (BTreeSet<String>, BTreeSet<String>) {
    let readme = std::fs::read_to_string(support::repo_root().join("README.md")).unwrap();
    let table = readme
        .split("| flag | environment | default | meaning |")
        .nth(1)
        .expect("README has the reference table");
    let mut flags = BTreeSet::new();
    let mut env = BTreeSet::new();
    for row in table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
    {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        flags.insert(cells[1].trim_matches('`').to_owned());
        let documented = cells[2]
            .split(',')
            .map(|name| name.trim().trim_matches('`'));
        env.extend(
            documented
                .filter(|name| name.starts_with("AWS_PGBOUNCER_"))
                .map(str::to_owned),
        );
    }
    (flags, env)
}

#[test]
fn the_readme_documents_every_run_flag_and_nothing_else() {
    let (cli_flags, cli_env) = cli_flags_and_env(&run_help());
    let (readme_flags, readme_env) = readme_table();
    assert!(
        cli_flags.len() > 10,
        "parsing --help found too little: {cli_flags:?}"
    );
    assert_eq!(readme_flags, cli_flags, "README flags vs `run --help`");
    assert_eq!(
        readme_env, cli_env,
        "README environment variables vs `run --help`"
    );
}
