//! A local moto server standing in for AWS STS, for role and web-identity credentials.

use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use super::child::run_checked;
use super::{ChildGuard, Creds, Testbed, free_port, log_output_to, test_dir, wait_until};

/// A moto server (STS AssumeRoleWithWebIdentity and friends) on 127.0.0.1.
pub struct Moto {
    port: u16,
    log: PathBuf,
    _dir: TempDir,
    guard: ChildGuard,
}

impl Moto {
    pub fn start() -> Moto {
        Self::start_on(free_port())
    }

    /// On a port chosen beforehand: for a client configured while the server is still down.
    pub fn start_on(port: u16) -> Moto {
        let tb = Testbed::locate();
        let dir = test_dir("moto");
        let log = dir.path().join("moto.log");
        let mut cmd = Command::new(&tb.moto_server);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .current_dir(dir.path());
        log_output_to(&mut cmd, &log);
        let mut guard = ChildGuard::spawn(cmd, "moto_server");
        let ok = wait_until(Duration::from_secs(30), || {
            !guard.is_running() || TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !ok || !guard.is_running() {
            panic!(
                "moto_server did not start:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Moto {
            port,
            log,
            _dir: dir,
            guard,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }

    /// Calls STS AssumeRoleWithWebIdentity on this server with botocore, as IRSA would.
    pub fn assume_role_with_web_identity(&self, role_arn: &str, session: &str, jwt: &str) -> Creds {
        let tb = Testbed::locate();
        let script = r#"
import json, sys, botocore.session
url, role, session, jwt = sys.argv[1:5]
c = botocore.session.Session().create_client(
    "sts", region_name="us-east-1", endpoint_url=url,
    aws_access_key_id="unused", aws_secret_access_key="unused")
r = c.assume_role_with_web_identity(RoleArn=role, RoleSessionName=session, WebIdentityToken=jwt)
k = r["Credentials"]
print(json.dumps({"akid": k["AccessKeyId"], "secret": k["SecretAccessKey"], "token": k["SessionToken"]}))
"#;
        let mut cmd = Command::new(&tb.python);
        cmd.arg("-c")
            .arg(script)
            .args([&self.url(), role_arn, session, jwt]);
        let out = run_checked(&mut cmd, "AssumeRoleWithWebIdentity");
        let v: Value = serde_json::from_slice(&out.stdout).expect("sts json");
        Creds {
            akid: v["akid"].as_str().unwrap().into(),
            secret: v["secret"].as_str().unwrap().into(),
            session_token: v["token"].as_str().map(Into::into),
        }
    }
}
