//! Tries to call the agent's `Check` the way another host user would: `hybrid <socket>`,
//! `kernel <cid>` or `serial <socket>`, with no key. Exits 0 if the agent answered, 2 if the
//! connection itself was refused (the message says why), 3 if the agent gave no answer. The
//! access-control tests run it as an unprivileged user.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a probe: a panic is its report

use std::path::{Path, PathBuf};
use std::time::Duration;

use cocoon_protocol::agent::CheckRequest;
use cocoon_protocol::agent_ttrpc::AgentServiceClient;
use cocoon_protocol::AGENT_PORT;
use vmm_driver::serial::SerialLink;
use vmm_driver::vsock::{connect_once, VsockEndpoint, VsockTransport};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let transport = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("hybrid"), Some(p)) => VsockTransport::Hybrid(PathBuf::from(p)),
        (Some("kernel"), Some(c)) => VsockTransport::Kernel {
            cid: c.parse().expect("a context id"),
        },
        (Some("serial"), Some(p)) => VsockTransport::Serial(SerialLink::new(Path::new(p))),
        _ => {
            eprintln!("usage: cocoon-agent-probe hybrid <socket> | kernel <cid> | serial <socket>");
            std::process::exit(64);
        }
    };
    let ep = VsockEndpoint {
        transport,
        key: None,
    };
    let stream = match connect_once(&ep, AGENT_PORT).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect: {e}");
            std::process::exit(2);
        }
    };
    let client = AgentServiceClient::new(ttrpc::r#async::Client::new(
        ttrpc::r#async::transport::Socket::new(stream),
    ));
    let limit = Duration::from_secs(5);
    let asked = tokio::time::timeout(
        limit,
        client.check(ttrpc::context::with_duration(limit), &CheckRequest::new()),
    )
    .await;
    match asked {
        Ok(Ok(r)) => {
            println!("the agent answered: API {}", r.api_version);
        }
        Ok(Err(e)) => {
            eprintln!("no answer: {e}");
            std::process::exit(3);
        }
        Err(_) => {
            eprintln!("no answer within {limit:?}");
            std::process::exit(3);
        }
    }
}
