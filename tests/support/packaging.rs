//! Helpers of the packaging tests (`packaging_kubernetes`, `packaging_examples`,
//! `packaging_images`): the repository's shipping files read as text or YAML, and the flags and
//! `AWS_PGBOUNCER_*` variables the binary's own `--help` lists. Nothing is built: no container
//! engine and no Nix store are available to the tests.

use serde::Deserialize;
use serde_norway::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

pub fn repo(path: &str) -> PathBuf {
    super::repo_root().join(path)
}

pub fn read(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

pub fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("{path}: {error}"))
        })
        .collect()
}

pub fn k8s_manifests() -> Vec<(String, Vec<Value>)> {
    let mut names: Vec<String> = fs::read_dir(repo("container/k8s"))
        .expect("container/k8s")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    names.sort();
    assert!(
        [
            "auth-query-mode.yaml",
            "config-mode.yaml",
            "job.yaml",
            "passthrough-mode.yaml",
            "pooler-tier.yaml",
            "supervised.yaml"
        ]
        .iter()
        .all(|want| names.iter().any(|name| name == want)),
        "container/k8s has {names:?}"
    );
    names
        .into_iter()
        .map(|name| {
            let path = format!("container/k8s/{name}");
            let documents = yaml_documents(&path);
            (path, documents)
        })
        .collect()
}

pub fn str_of<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(value, path).and_then(Value::as_str)
}

pub fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(*key))
}

pub fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_owned(),
            })
            .collect(),
        Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

pub fn run_binary(args: &[&str]) -> Output {
    Command::new(super::daemon::BINARY)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/tmp")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run the aws-pgbouncer binary")
}

/// The flags and `AWS_PGBOUNCER_*` variables a subcommand's `--help` lists.
pub fn help_of(subcommand: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let output = run_binary(&[subcommand, "--help"]);
    assert!(output.status.success(), "{subcommand} --help failed");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut flags = BTreeSet::new();
    let mut vars = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || c == '[' || c == ']' || c == ',') {
        if let Some(name) = word.strip_prefix("--") {
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() {
                flags.insert(format!("--{name}"));
            }
        }
        if let Some(start) = word.find("AWS_PGBOUNCER_") {
            vars.insert(env_var_at(&word[start..]));
        }
    }
    assert!(
        flags.contains("--help"),
        "{subcommand} --help lists no flags"
    );
    (flags, vars)
}

fn env_var_at(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
        .collect()
}

pub fn env_vars_in(text: &str) -> BTreeSet<String> {
    text.match_indices("AWS_PGBOUNCER_")
        .map(|(at, _)| env_var_at(&text[at..]))
        .collect()
}

/// Checks a daemon command line (`run ...` or `wait ...`, as in a container's args).
pub fn check_command_line(origin: &str, args: &[String]) {
    let Some(subcommand) = args.first() else {
        return;
    };
    let subcommand = subcommand.rsplit('/').next().unwrap();
    let (args, subcommand) = if subcommand == "aws-pgbouncer" {
        (&args[1..], args.get(1).map(String::as_str).unwrap_or(""))
    } else {
        (args, subcommand)
    };
    assert!(
        ["run", "wait", "check"].contains(&subcommand),
        "{origin}: the daemon is started with {args:?}"
    );
    let (flags, _) = help_of(subcommand);
    for arg in args.iter().filter(|arg| arg.starts_with("--")) {
        let flag = arg.split('=').next().unwrap();
        assert!(
            flags.contains(flag),
            "{origin}: {flag} is not a flag of `aws-pgbouncer {subcommand}`"
        );
    }
}
