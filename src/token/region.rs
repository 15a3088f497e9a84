//! Which region a token is signed for.
//!
//! The order matches what users of `aws rds generate-db-auth-token` expect: an explicit flag,
//! then the SDK's environment and profile settings, then the region spelled in an RDS host
//! name. IMDS is deliberately not asked: off EC2 it costs seconds of timeouts, and a wrong
//! guess would only produce tokens that RDS rejects.

use aws_config::environment::region::EnvironmentVariableRegionProvider;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;

#[derive(Debug, thiserror::Error)]
#[error(
    "no AWS region for host {host}: pass --region, set AWS_REGION, set a region in the AWS \
     profile, or use an RDS host name (NAME.REGION.rds.amazonaws.com)"
)]
pub struct RegionError {
    host: String,
}

pub async fn resolve_region(explicit: Option<&str>, host: &str) -> Result<String, RegionError> {
    if let Some(region) = explicit.filter(|region| !region.is_empty()) {
        return Ok(region.to_owned());
    }
    let configured = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(ProfileFileRegionProvider::new())
        .region()
        .await;
    configured
        .map(|region| region.as_ref().to_owned())
        .or_else(|| region_from_host(host))
        .ok_or_else(|| RegionError {
            host: host.to_owned(),
        })
}

/// `db.abc.eu-west-1.rds.amazonaws.com` → `eu-west-1`; also the `.com.cn` partition. Host names
/// are case-insensitive but credential scopes are not, so the region comes out in lower case.
fn region_from_host(host: &str) -> Option<String> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let prefix = [".rds.amazonaws.com", ".rds.amazonaws.com.cn"]
        .iter()
        .find_map(|suffix| host.strip_suffix(suffix))?;
    let region = prefix.rsplit('.').next()?;
    let looks_like_region = region.split('-').count() >= 3
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-');
    looks_like_region.then(|| region.to_owned())
}

#[cfg(test)]
mod tests {
    use super::region_from_host;

    #[test]
    fn region_comes_from_rds_host_names() {
        let cases = [
            ("mydb.abc123.eu-west-1.rds.amazonaws.com", Some("eu-west-1")),
            (
                "x.cluster-ro-abc.us-east-2.rds.amazonaws.com.",
                Some("us-east-2"),
            ),
            (
                "MyDB.ABC.CN-NORTH-1.RDS.AMAZONAWS.COM.CN",
                Some("cn-north-1"),
            ),
            (
                "proxy.proxy-abc.ap-southeast-2.rds.amazonaws.com",
                Some("ap-southeast-2"),
            ),
            ("localhost", None),
            ("rds.amazonaws.com", None),
            ("db.example.com", None),
            ("db.notaregion.rds.amazonaws.com", None),
        ];
        for (host, expected) in cases {
            assert_eq!(region_from_host(host).as_deref(), expected, "{host}");
        }
    }
}
