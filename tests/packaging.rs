//! The shipping files agree with the daemon and with themselves: container images
//! (`container/Dockerfile`, `container/standin/Dockerfile`), the compose demo, the Kubernetes
//! manifests (`container/k8s/`), the example configurations (`pgbouncer/`) and `flake.nix`.
//!
//! What runs here and what does not: no container engine and no Nix store are available, so
//! nothing is built. The manifests and the compose file are parsed as YAML and checked for
//! structure (start-up order, shared directory, same uid, probes); every `--flag` and
//! `AWS_PGBOUNCER_*` variable they use is looked up in the binary's own `--help`; the example
//! TOML files are run through the daemon's parser; `flake.nix` is parsed by
//! `nix-instantiate --parse` (required: this test fails when Nix is missing); the compose file
//! is also validated by `docker compose config` where the docker CLI has the compose plugin,
//! else by `docker-compose config` (Debian's docker-compose 1.29) where that is installed, and
//! otherwise by the structural checks alone; the Dockerfiles' `FROM` lines must be pinned to
//! a tag and every `COPY` source must exist and pass the build-context filter.

mod support;

use serde::Deserialize;
use serde_norway::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(path: &str) -> PathBuf {
    support::repo_root().join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|error| panic!("{path}: {error}"))
}

fn yaml_documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("{path}: {error}"))
        })
        .collect()
}

fn k8s_manifests() -> Vec<(String, Vec<Value>)> {
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

fn str_of<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(value, path).and_then(Value::as_str)
}

fn get<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(*key))
}

fn seq<'a>(value: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    get(value, path)
        .and_then(Value::as_sequence)
        .map(|items| items.iter().collect())
        .unwrap_or_default()
}

fn strings(value: Option<&Value>) -> Vec<String> {
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

fn run_binary(args: &[&str]) -> Output {
    Command::new(support::daemon::BINARY)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", "/tmp")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run the aws-pgbouncer binary")
}

/// The flags and `AWS_PGBOUNCER_*` variables a subcommand's `--help` lists.
fn help_of(subcommand: &str) -> (BTreeSet<String>, BTreeSet<String>) {
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

fn env_vars_in(text: &str) -> BTreeSet<String> {
    text.match_indices("AWS_PGBOUNCER_")
        .map(|(at, _)| env_var_at(&text[at..]))
        .collect()
}

/// Checks a daemon command line (`run ...` or `wait ...`, as in a container's args).
fn check_command_line(origin: &str, args: &[String]) {
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

// ------------------------------------------------------------------------ Kubernetes

/// The pod template of the manifest's workload: a Deployment's, a Job's or a CronJob's.
fn pod_template<'a>(path: &str, documents: &'a [Value]) -> &'a Value {
    documents
        .iter()
        .find_map(|doc| match str_of(doc, &["kind"])? {
            "Deployment" | "Job" => get(doc, &["spec", "template", "spec"]),
            "CronJob" => get(doc, &["spec", "jobTemplate", "spec", "template", "spec"]),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{path}: no Deployment, Job or CronJob"))
}

#[test]
fn kubernetes_manifests_run_native_sidecars_in_order_as_one_uid() {
    for (path, documents) in k8s_manifests() {
        let kinds: Vec<&str> = documents
            .iter()
            .filter_map(|doc| str_of(doc, &["kind"]))
            .collect();
        assert!(kinds.contains(&"ServiceAccount"), "{path}: {kinds:?}");
        let account = documents
            .iter()
            .find(|doc| str_of(doc, &["kind"]) == Some("ServiceAccount"))
            .unwrap();
        let role = str_of(
            account,
            &["metadata", "annotations", "eks.amazonaws.com/role-arn"],
        )
        .unwrap_or_else(|| panic!("{path}: the ServiceAccount has no IRSA role annotation"));
        assert!(role.starts_with("arn:aws:iam::"), "{path}: {role}");
        let text = read(&path);
        assert!(
            text.contains("Pod Identity") && text.contains("pod-identity-association"),
            "{path}: say how EKS Pod Identity differs"
        );

        let pod = pod_template(&path, &documents);
        assert_eq!(
            str_of(pod, &["serviceAccountName"]),
            str_of(account, &["metadata", "name"]),
            "{path}"
        );
        // One non-root uid for every container: the daemon's files are 0600 in a 0700 dir.
        let uid = get(pod, &["securityContext", "runAsUser"]).and_then(Value::as_u64);
        assert!(uid.is_some_and(|uid| uid != 0), "{path}: pod runAsUser");
        assert_eq!(
            get(pod, &["securityContext", "runAsNonRoot"]).and_then(Value::as_bool),
            Some(true),
            "{path}"
        );
        let sidecars = seq(pod, &["initContainers"]);
        let apps = seq(pod, &["containers"]);
        assert!(!apps.is_empty(), "{path}: no application container");
        for container in sidecars.iter().chain(&apps) {
            let name = str_of(container, &["name"]).unwrap();
            assert!(
                get(container, &["securityContext", "runAsUser"]).is_none(),
                "{path}: {name} overrides the pod's uid"
            );
        }
        for sidecar in &sidecars {
            assert_eq!(
                str_of(sidecar, &["restartPolicy"]),
                Some("Always"),
                "{path}: {} is not a native sidecar",
                str_of(sidecar, &["name"]).unwrap()
            );
        }

        // The daemon comes first (a native sidecar) or runs PgBouncer itself (an ordinary
        // container, --supervise), serves HTTP beyond loopback (the kubelet probes the pod
        // IP), and is probed for readiness and liveness.
        let named = |container: &&Value| str_of(container, &["name"]) == Some("aws-pgbouncer");
        let daemon = match sidecars.first() {
            Some(first) => *first,
            None => apps
                .iter()
                .copied()
                .find(named)
                .unwrap_or_else(|| panic!("{path}: no aws-pgbouncer container")),
        };
        assert!(
            named(&daemon),
            "{path}: the first sidecar is not aws-pgbouncer"
        );
        let env = |container: &Value, name: &str| -> Option<String> {
            seq(container, &["env"])
                .into_iter()
                .find(|var| str_of(var, &["name"]) == Some(name))
                .and_then(|var| str_of(var, &["value"]).map(str::to_owned))
        };
        let http = env(daemon, "AWS_PGBOUNCER_HTTP_LISTEN")
            .unwrap_or_else(|| panic!("{path}: the kubelet cannot reach 127.0.0.1:9090"));
        assert!(http.starts_with("0.0.0.0:"), "{path}: {http}");
        let port: u64 = http.rsplit(':').next().unwrap().parse().unwrap();
        let probe = |container: &Value, kind: &str| -> Option<(String, u64)> {
            let get_probe = get(container, &[kind, "httpGet"])?;
            Some((
                str_of(get_probe, &["path"])?.to_owned(),
                get(get_probe, &["port"])?.as_u64()?,
            ))
        };
        assert_eq!(
            probe(daemon, "readinessProbe"),
            Some(("/readyz".into(), port)),
            "{path}"
        );
        assert_eq!(
            probe(daemon, "livenessProbe"),
            Some(("/healthz".into(), port)),
            "{path}"
        );
        if let Some(last) = sidecars.last() {
            // The last sidecar's startup probe is /startupz: the app starts only after
            // PgBouncer has the first tokens.
            assert_eq!(
                probe(last, "startupProbe"),
                Some(("/startupz".into(), port)),
                "{path}: {} must gate the app on /startupz",
                str_of(last, &["name"]).unwrap()
            );
        } else {
            // Ordinary containers start together and a Job ends only when all have exited:
            // the daemon runs PgBouncer itself, so that it ends with it, and every other
            // container waits for /startupz and ends the daemon when done.
            let mut args = strings(get(daemon, &["args"]));
            args.extend(strings(get(daemon, &["command"])));
            assert!(args.iter().any(|arg| arg == "--supervise"), "{path}");
            for app in apps.iter().filter(|container| !named(container)) {
                let script = strings(get(app, &["command"])).join(" ");
                let polls = format!("http://127.0.0.1:{port}/startupz");
                let quits = format!("--post-data= http://127.0.0.1:{port}/quitquitquit");
                assert!(
                    script.contains(&polls) && script.contains(&quits),
                    "{path}: the app must wait for {polls} and end with {quits}: {script}"
                );
                assert_eq!(
                    env(daemon, "AWS_PGBOUNCER_QUITQUITQUIT").as_deref(),
                    Some("true"),
                    "{path}"
                );
            }
        }
        if sidecars.len() > 1 {
            // The daemon cannot report /startupz before PgBouncer runs: gating PgBouncer's
            // start on it would deadlock.
            assert_ne!(
                probe(daemon, "startupProbe").map(|(path, _)| path),
                Some("/startupz".into()),
                "{path}"
            );
        }

        // The shared directory: an in-memory emptyDir, mounted at one path in every sidecar.
        let volume = seq(pod, &["volumes"])
            .into_iter()
            .find(|volume| str_of(volume, &["emptyDir", "medium"]) == Some("Memory"))
            .unwrap_or_else(|| panic!("{path}: no emptyDir with medium Memory"));
        let volume_name = str_of(volume, &["name"]).unwrap();
        let with_daemon = [daemon];
        let sharing = match sidecars.is_empty() {
            true => &with_daemon[..],
            false => &sidecars[..],
        };
        let mount_paths: BTreeSet<&str> = sharing
            .iter()
            .map(|sidecar| {
                seq(sidecar, &["volumeMounts"])
                    .into_iter()
                    .find(|mount| str_of(mount, &["name"]) == Some(volume_name))
                    .and_then(|mount| str_of(mount, &["mountPath"]))
                    .unwrap_or_else(|| panic!("{path}: a sidecar lacks {volume_name}"))
            })
            .collect();
        assert_eq!(
            mount_paths,
            BTreeSet::from(["/run/aws-pgbouncer"]),
            "{path}: the files name each other by absolute path"
        );

        // Flags and variables of the daemon exist in its --help.
        let (_, vars) = help_of("run");
        let mut args = strings(get(daemon, &["command"]));
        args.extend(strings(get(daemon, &["args"])));
        check_command_line(&format!("{path}: aws-pgbouncer"), &args);
        for container in sidecars.iter().chain(&apps) {
            for var in seq(container, &["env"]) {
                let name = str_of(var, &["name"]).unwrap();
                if name.starts_with("AWS_PGBOUNCER_") {
                    assert!(vars.contains(name), "{path}: {name} is not in run --help");
                }
            }
        }
        for var in env_vars_in(&text) {
            assert!(vars.contains(&var), "{path}: {var} is not in run --help");
        }
    }
}

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

// ----------------------------------------------------------------------------- Nix

#[test]
fn flake_parses() {
    let output = Command::new("nix-instantiate")
        .args(["--parse", repo("flake.nix").to_str().unwrap()])
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "nix-instantiate is missing ({error}): install Debian's `nix-bin` package \
                 (scripts/provision.sh)"
            )
        });
    assert!(
        output.status.success(),
        "flake.nix does not parse: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = read("flake.nix");
    assert!(text.contains("cargoLock.lockFile = ./Cargo.lock;"));
    assert!(text.contains("dockerTools.buildLayeredImage"));
    let (_, vars) = help_of("run");
    for var in env_vars_in(&text) {
        assert!(vars.contains(&var), "flake.nix: {var} is not in run --help");
    }
}

// ----------------------------------------------------------------------- Dockerfiles

struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of a Dockerfile, continuation lines joined, comments dropped.
fn instructions(path: &str) -> Vec<Instruction> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in read(path).lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (keyword, args) = line.split_once(' ').unwrap_or((&line, ""));
            Instruction {
                keyword: keyword.to_uppercase(),
                args: args.trim().to_owned(),
            }
        })
        .collect()
}

/// `*` then `!path` lines: what the build context keeps.
fn context_keeps(ignore_file: &str, source: &str) -> bool {
    let text = read(ignore_file);
    let rules: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(
        rules.first(),
        Some(&"*"),
        "{ignore_file}: expected `*` first"
    );
    rules[1..].iter().any(|rule| {
        let kept = rule.strip_prefix('!').expect("only ! rules after *");
        let kept = kept.trim_end_matches('/');
        source == kept || source.starts_with(&format!("{kept}/"))
    })
}

fn check_dockerfile(path: &str) -> Vec<Instruction> {
    let all = instructions(path);
    let ignore = format!("{path}.dockerignore");
    let mut args = std::collections::BTreeMap::new();
    let mut stages = BTreeSet::new();
    for instruction in &all {
        let words: Vec<&str> = instruction.args.split_whitespace().collect();
        match instruction.keyword.as_str() {
            "ARG" if stages.is_empty() => {
                if let Some((name, value)) = instruction.args.split_once('=') {
                    args.insert(name.to_owned(), value.to_owned());
                }
            }
            "FROM" => {
                let mut image = words
                    .iter()
                    .find(|word| !word.starts_with("--"))
                    .unwrap()
                    .to_string();
                if let Some(name) = image
                    .strip_prefix("${")
                    .and_then(|rest| rest.strip_suffix('}'))
                {
                    image = args
                        .get(name)
                        .unwrap_or_else(|| panic!("{path}: ARG {name} has no default"))
                        .clone();
                }
                if !stages.contains(&image) {
                    let tag = image.rsplit('/').next().unwrap().split_once(':');
                    assert!(
                        tag.is_some_and(|(_, tag)| !tag.is_empty() && tag != "latest"),
                        "{path}: FROM {image} is not pinned to a tag"
                    );
                }
                if let Some(at) = words
                    .iter()
                    .position(|word| word.eq_ignore_ascii_case("AS"))
                {
                    stages.insert(words[at + 1].to_owned());
                }
            }
            "COPY" => {
                let from = words.iter().find_map(|word| word.strip_prefix("--from="));
                let operands: Vec<&str> = words
                    .iter()
                    .copied()
                    .filter(|word| !word.starts_with("--"))
                    .collect();
                let sources = &operands[..operands.len() - 1];
                match from {
                    Some(stage) => assert!(
                        stages.contains(stage),
                        "{path}: COPY --from={stage} names no earlier stage"
                    ),
                    None => {
                        for source in sources {
                            let source = source.trim_start_matches("./").trim_end_matches('/');
                            assert!(
                                repo(source).exists(),
                                "{path}: COPY {source}: not in the repository"
                            );
                            assert!(
                                context_keeps(&ignore, source),
                                "{path}: COPY {source} is filtered out by {ignore}"
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    all
}

/// The instructions of one stage (from its FROM to the next).
fn stage<'a>(all: &'a [Instruction], name: &str) -> &'a [Instruction] {
    let start = all
        .iter()
        .position(|i| i.keyword == "FROM" && i.args.ends_with(&format!(" AS {name}")))
        .unwrap_or_else(|| panic!("no stage {name}"));
    let end = all[start + 1..]
        .iter()
        .position(|i| i.keyword == "FROM")
        .map_or(all.len(), |offset| start + 1 + offset);
    &all[start..end]
}

#[test]
fn dockerfiles_pin_their_bases_and_copy_what_exists() {
    let all = check_dockerfile("container/Dockerfile");
    let (flags, vars) = help_of("run");
    let build = stage(&all, "build");
    assert!(
        build
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("cargo build --release --locked")),
        "the build must use Cargo.lock as it is"
    );
    assert!(
        all.iter().any(|i| i.keyword == "ARG"
            && i.args
                == "RDS_CA_BUNDLE_URL=https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"),
        "the RDS CA bundle's address"
    );
    assert!(
        build.iter().any(|i| i.keyword == "ADD"
            && i.args
                .contains("${RDS_CA_BUNDLE_URL} /out/etc/ssl/rds/global-bundle.pem")),
        "the RDS CA bundle is fetched at build time"
    );
    assert!(flags.contains("--supervise") && vars.contains("AWS_PGBOUNCER_MODE"));
    for name in ["runtime", "supervised"] {
        let instructions = stage(&all, name);
        let find = |keyword: &str| -> Vec<&str> {
            instructions
                .iter()
                .filter(|i| i.keyword == keyword)
                .map(|i| i.args.as_str())
                .collect()
        };
        assert_eq!(
            find("ENTRYPOINT"),
            vec![r#"["/usr/local/bin/aws-pgbouncer"]"#],
            "{name}"
        );
        assert_eq!(find("CMD"), vec![r#"["run"]"#], "{name}");
        let user = find("USER");
        let user = user.last().expect("a USER");
        assert!(
            !user.starts_with('0') && !user.starts_with("root"),
            "{name}: {user}"
        );
        assert!(
            find("COPY")
                .iter()
                .any(|copy| copy.ends_with(" /usr/local/bin/aws-pgbouncer")),
            "{name}"
        );
        assert!(
            find("COPY")
                .iter()
                .any(|copy| copy.ends_with(" /etc/ssl/rds/global-bundle.pem")),
            "{name}"
        );
        let env = find("ENV").join(" ");
        assert!(
            env.contains("AWS_PGBOUNCER_SERVER_CA_FILE=/etc/ssl/rds/global-bundle.pem")
                && env.contains("AWS_PGBOUNCER_PGBOUNCER_DIR=/run/aws-pgbouncer"),
            "{name}: {env}"
        );
        for var in env_vars_in(&env) {
            assert!(vars.contains(&var), "{name}: {var} is not in run --help");
        }
    }
    let supervised = stage(&all, "supervised");
    assert!(supervised[0].args.starts_with("debian:trixie"));
    assert!(
        supervised
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("pgbouncer --version")),
        "the supervised image proves its PgBouncer version at build time"
    );
    // The default build takes PgBouncer's release tarball, so it must work without build
    // arguments: a pinned version with its checksum, which the stage checks.
    let default_of = |name: &str| {
        all.iter()
            .find_map(|i| {
                (i.keyword == "ARG")
                    .then(|| i.args.strip_prefix(&format!("{name}=")))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("ARG {name} has no default"))
    };
    assert_eq!(default_of("PGBOUNCER_FROM"), "release");
    assert_eq!(default_of("PGBOUNCER_VERSION"), "1.26.1");
    let checksum = default_of("PGBOUNCER_SHA256");
    assert!(
        checksum.len() == 64 && checksum.bytes().all(|b| b.is_ascii_hexdigit()),
        "PGBOUNCER_SHA256 must default to a SHA-256, not {checksum:?}"
    );
    assert!(
        stage(&all, "pgbouncer").iter().any(|i| i.keyword == "RUN"
            && i.args
                .contains(r#"echo "$PGBOUNCER_SHA256  pgbouncer.tar.gz" | sha256sum -c -"#)),
        "the release tarball is checked against PGBOUNCER_SHA256"
    );
    assert!(flags.contains("--supervise"));

    let standin = check_dockerfile("container/standin/Dockerfile");
    let entrypoint = standin
        .iter()
        .rfind(|i| i.keyword == "ENTRYPOINT")
        .expect("the stand-in's entrypoint");
    assert!(entrypoint.args.contains("standin-entrypoint"));
    // The stand-in runs what the test bed runs.
    for source in [
        "tests/standin/pam_standin.c",
        "tests/standin/verifier.py",
        "scripts/standin",
        "sql",
        "container/standin/entrypoint.sh",
    ] {
        assert!(
            standin
                .iter()
                .any(|i| i.keyword == "COPY" && i.args.split_whitespace().any(|w| w == source)),
            "the stand-in image lacks {source}"
        );
    }
    // Its test-bed variable is scripts/standin's, not the daemon's.
    let text = read("container/standin/Dockerfile");
    for var in env_vars_in(&text) {
        assert!(
            var == "AWS_PGBOUNCER_TESTBED" || vars.contains(&var),
            "container/standin/Dockerfile: {var}"
        );
    }
    assert!(read("scripts/standin").contains("AWS_PGBOUNCER_TESTBED"));
}
