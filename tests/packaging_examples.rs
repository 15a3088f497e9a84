//! The examples agree with the daemon: the compose demo is valid and wired as a pod, the example
//! TOML files pass the daemon's parser, the own-pgbouncer.ini example takes the daemon's files,
//! and the SQL example has what the README promises.

mod support;

use serde_norway::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use support::packaging::{
    check_command_line, env_vars_in, get, help_of, k8s_manifests, read, repo, run_binary, str_of,
    strings, yaml_documents,
};

// --------------------------------------------------------------------------- compose

/// The compose demo's structure. Validated as well by `docker compose config` when the docker
/// CLI has the compose plugin, else by `docker-compose config` when that is installed; the
/// structural checks run in every case.
#[test]
fn compose_demo_is_valid_and_wired_as_a_pod() {
    let path = "container/docker-compose.yml";
    let compose = yaml_documents(path).pop().expect("one document");
    let file = repo(path);
    let file = file.to_str().unwrap();
    let plugin = Command::new("docker").args(["compose", "version"]).output();
    if plugin.is_ok_and(|output| output.status.success()) {
        let output = Command::new("docker")
            .args(["compose", "-f", file, "config", "-q"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker compose config: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    } else if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        let output = Command::new("docker-compose")
            .args(["-f", file, "config", "-q"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "docker-compose config: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let service = |name: &str| {
        get(&compose, &["services", name]).unwrap_or_else(|| panic!("{path}: no service {name}"))
    };
    let daemon = service("aws-pgbouncer");
    let pgbouncer = service("pgbouncer");
    let app = service("app");
    let standin = service("standin");

    // Builds from this repository, with Dockerfiles and targets that exist.
    for (name, svc) in [("aws-pgbouncer", daemon), ("standin", standin)] {
        let context = Path::new(file)
            .parent()
            .unwrap()
            .join(str_of(svc, &["build", "context"]).unwrap());
        let dockerfile = context.join(str_of(svc, &["build", "dockerfile"]).unwrap());
        assert!(dockerfile.is_file(), "{path}: {name}: {dockerfile:?}");
        assert_eq!(context.canonicalize().unwrap(), support::repo_root());
        if let Some(target) = str_of(svc, &["build", "target"]) {
            let text = fs::read_to_string(&dockerfile).unwrap();
            assert!(
                text.lines()
                    .any(|line| line.starts_with("FROM ")
                        && line.ends_with(&format!(" AS {target}"))),
                "{path}: {name}: no stage {target}"
            );
        }
    }

    // PgBouncer: a stock 1.25.x image in the daemon's network namespace (the daemon reaches
    // its admin console on loopback), as the daemon's uid, on the daemon's pgbouncer.ini.
    let image = str_of(pgbouncer, &["image"]).unwrap();
    assert!(image.starts_with("edoburu/pgbouncer:v1.25."), "{image}");
    assert_eq!(
        str_of(pgbouncer, &["network_mode"]),
        Some("service:aws-pgbouncer")
    );
    assert_eq!(str_of(pgbouncer, &["user"]), str_of(daemon, &["user"]));
    let user = str_of(daemon, &["user"]).unwrap();
    assert!(
        !user.starts_with("0:") && user != "0" && user != "root",
        "{user}"
    );
    let command = strings(get(pgbouncer, &["command"])).join(" ");
    assert!(
        command.contains("/run/aws-pgbouncer/pgbouncer.ini"),
        "{command}"
    );

    // Shared volumes at the same path in both: the directory and the stand-in's CA.
    let mounts = |svc: &Value| -> BTreeSet<String> {
        strings(get(svc, &["volumes"]))
            .into_iter()
            .filter(|mount| !mount.starts_with('.'))
            .map(|mount| mount.trim_end_matches(":ro").to_owned())
            .collect()
    };
    let shared: BTreeSet<String> = mounts(daemon)
        .intersection(&mounts(pgbouncer))
        .cloned()
        .collect();
    assert!(
        shared.contains("pgbouncer-dir:/run/aws-pgbouncer"),
        "{path}: {shared:?}"
    );
    let env = |svc: &Value, name: &str| str_of(svc, &["environment", name]).map(str::to_owned);
    let ca = env(daemon, "AWS_PGBOUNCER_SERVER_CA_FILE").expect("the stand-in's CA");
    assert!(
        shared
            .iter()
            .any(|mount| ca.starts_with(&format!("{}/", mount.split(':').nth(1).unwrap()))),
        "{path}: PgBouncer cannot read {ca}"
    );
    assert!(
        mounts(standin)
            .iter()
            .any(|mount| mount.starts_with("standin-ca:")),
        "{path}: the stand-in does not export its CA"
    );

    // The stand-in's test keys, and the app after /startupz.
    assert_eq!(
        env(daemon, "AWS_ACCESS_KEY_ID").as_deref(),
        Some("AKIAIOSFODNN7EXAMPLE")
    );
    assert_eq!(
        env(daemon, "AWS_SECRET_ACCESS_KEY").as_deref(),
        Some("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    );
    assert_eq!(
        str_of(app, &["depends_on", "aws-pgbouncer", "condition"]),
        Some("service_healthy")
    );
    let health = strings(get(daemon, &["healthcheck", "test"]));
    assert_eq!(health.first().map(String::as_str), Some("CMD"));
    check_command_line(&format!("{path}: healthcheck"), &health[1..]);
    check_command_line(
        &format!("{path}: aws-pgbouncer"),
        &strings(get(daemon, &["command"])),
    );
    let (_, vars) = help_of("run");
    for var in env_vars_in(&read(path)) {
        assert!(vars.contains(&var), "{path}: {var} is not in run --help");
    }

    // The app is another container: PgBouncer listens beyond loopback and the app has a
    // password from [[clients]].
    let toml_mount = strings(get(daemon, &["volumes"]))
        .into_iter()
        .find(|mount| mount.starts_with("./") && mount.contains(".toml"))
        .expect("the daemon's config file");
    let toml_path = format!(
        "container/{}",
        toml_mount
            .split(':')
            .next()
            .unwrap()
            .trim_start_matches("./")
    );
    let config: toml::Value = toml::from_str(&read(&toml_path)).unwrap();
    assert!(
        config["listen"].as_str().unwrap().starts_with("0.0.0.0:"),
        "{toml_path}"
    );
    assert!(config["token_lifetime"].as_integer().unwrap() <= 60);
    let password = env(app, "PGPASSWORD").expect("the app's password");
    assert!(
        config["clients"]
            .as_array()
            .unwrap()
            .iter()
            .any(|client| client.get("user").and_then(toml::Value::as_str)
                == env(app, "PGUSER").as_deref()
                && client.get("password").and_then(toml::Value::as_str) == Some(&password)),
        "{toml_path}: no [[clients]] entry for the app's user and password"
    );
}

// ----------------------------------------------------------------- example configs

/// The daemon's parser takes each example: the run fails only where it first touches the disk,
/// at `--pgbouncer-dir` under a regular file, which comes after every setting is resolved.
#[test]
fn example_toml_files_are_accepted_by_the_daemon() {
    let scratch = tempfile::tempdir().unwrap();
    let ca = scratch.path().join("ca.pem");
    fs::write(&ca, "not used\n").unwrap();
    let blocker = scratch.path().join("a-file");
    fs::write(&blocker, "").unwrap();
    let dir = blocker.join("dir");
    let parse = |config: &Path| {
        let output = run_binary(&[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--server-ca-file",
            ca.to_str().unwrap(),
            "--pgbouncer-dir",
            dir.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(1), "{config:?}");
        String::from_utf8(output.stderr).unwrap()
    };
    let mut files = vec![repo("container/demo/aws-pgbouncer.toml")];
    for entry in fs::read_dir(repo("pgbouncer")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            files.push(path);
        }
    }
    // TOML files that manifests carry in a Secret or a ConfigMap.
    for (path, documents) in k8s_manifests() {
        for doc in &documents {
            let data = get(doc, &["stringData"]).or_else(|| get(doc, &["data"]));
            for (key, value) in data.and_then(Value::as_mapping).into_iter().flatten() {
                let key = key.as_str().unwrap();
                if key.ends_with(".toml") {
                    let name = format!("{}-{key}", path.replace('/', "_"));
                    let file = scratch.path().join(name);
                    fs::write(&file, value.as_str().unwrap()).unwrap();
                    files.push(file);
                }
            }
        }
    }
    assert!(files.len() >= 4, "{files:?}");
    let (flags, _) = help_of("run");
    for file in &files {
        let stderr = parse(file);
        assert!(
            stderr.contains(&format!("cannot write or read {}", dir.display())),
            "{file:?} was not accepted: {stderr}"
        );
        // Every top-level setting is one of run's flags, spelt with underscores.
        let config: toml::Value = toml::from_str(&fs::read_to_string(file).unwrap()).unwrap();
        for (key, value) in config.as_table().unwrap() {
            if !value.is_table() && !value.is_array() {
                let flag = format!("--{}", key.replace('_', "-"));
                assert!(flags.contains(&flag), "{file:?}: {key} has no flag {flag}");
            }
        }
    }
    // The check discriminates: a misspelt key is refused before the directory is touched.
    let bad = scratch.path().join("bad.toml");
    let text = fs::read_to_string(&files[0]).unwrap();
    fs::write(&bad, format!("token_lifetme = 60\n{text}")).unwrap();
    let stderr = parse(&bad);
    assert!(
        stderr.contains("token_lifetme") && !stderr.contains("cannot write or read"),
        "{stderr}"
    );
}

#[test]
fn own_pgbouncer_ini_takes_the_daemons_files_by_absolute_path() {
    let text = read("pgbouncer/own-pgbouncer.ini");
    let settings: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(key, _)| !key.trim_start().starts_with(';'))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let setting = |key: &str| {
        settings
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    };
    assert_eq!(setting("auth_type"), Some("hba"));
    assert_eq!(
        setting("auth_file"),
        Some("/run/aws-pgbouncer/userlist.txt")
    );
    assert_eq!(
        setting("auth_hba_file"),
        Some("/run/aws-pgbouncer/pg_hba.conf")
    );
    assert_eq!(setting("admin_users"), Some("aws_pgbouncer_admin"));
    assert!(
        text.lines()
            .any(|line| line == "%include /run/aws-pgbouncer/databases.ini"),
        "the databases come from the daemon's databases.ini, by absolute path"
    );
    // README's section names every setting the example takes from the daemon.
    let readme = read("README.md");
    let section = readme
        .split("### Keeping your own pgbouncer.ini")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("README has the section");
    for key in [
        "auth_type",
        "auth_file",
        "auth_hba_file",
        "admin_users",
        "server_tls_sslmode",
        "server_tls_ca_file",
    ] {
        let line = format!("`{key} = {}`", setting(key).unwrap());
        assert!(
            section.contains(&line),
            "README's own-ini section lacks {line}"
        );
    }
    assert!(
        section.contains("databases.ini ]"),
        "README gives the start order"
    );
}

#[test]
fn iam_users_sql_has_a_read_only_user_and_says_auth_query_needs_nothing() {
    let text = read("sql/iam-users.sql");
    assert!(text.contains("GRANT rds_iam TO reporter;"));
    assert!(text.contains("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reporter;"));
    assert!(text.contains("Auth-query mode") && text.contains("needs nothing more on RDS"));
}
