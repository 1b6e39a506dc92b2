//! Embed afo's OpenAI-compatible server in an existing axum application:
//! `cargo run --example embed_server` (add `-- --serve` to keep serving on
//! 127.0.0.1:8080 until Ctrl-C).
//!
//! The application has its own routes (`/hello`); afo's router is merged beside them,
//! so the same listener serves `/v1/chat/completions`, `/v1/models`, `/health`,
//! `/metrics` and the dashboard at `/`. The runtime (cutline, ledger, SSOT log) is the
//! application's to configure. Without `--serve`, the example calls its own routes
//! once over loopback and exits.

use std::sync::Arc;

use afo_runtime::Runtime;
use afo_server::Server;
use axum::routing::get;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let keep_serving = std::env::args().any(|a| a == "--serve");
    let runtime = Arc::new(
        Runtime::builder()
            .cutline("2GiB".parse()?)
            .ssot_log(afo_examples::examples_log())
            .build()?,
    );
    let afo = Server::builder(runtime)
        .model(afo_examples::smollm2()?)
        .build()?;

    // The existing application, with afo's routes merged in.
    let app = axum::Router::new()
        .route(
            "/hello",
            get(|| async { "hello from the host application\n" }),
        )
        .merge(afo_server::router(&afo));

    let addr = if keep_serving {
        "127.0.0.1:8080"
    } else {
        "127.0.0.1:0"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("serving on http://{addr} (the host's /hello and afo's /v1, /health, /)");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    if keep_serving {
        tokio::signal::ctrl_c().await?;
    } else {
        print!("{}", request(addr, "GET", "/hello", "").await?);
        let chat = r#"{"model":"SmolLM2-135M-Instruct.Q4_1","max_tokens":16,"temperature":0,
            "messages":[{"role":"user","content":"Say hello in French."}]}"#;
        let reply = request(addr, "POST", "/v1/chat/completions", chat).await?;
        println!("{reply}");
        anyhow::ensure!(
            reply.contains("chat.completion"),
            "no completion in the reply"
        );
    }
    let _ = stop.send(());
    server.await??;
    // The model workers finish what they hold and stop.
    afo.shutdown();
    Ok(())
}

/// One HTTP/1.1 request over a fresh connection; the response body (a client such as
/// `reqwest` or the `openai` package would do the same).
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response.lines().next().unwrap_or_default().to_owned();
    anyhow::ensure!(status.contains(" 200 "), "{method} {path}: {status}");
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.clone(), |(_, b)| b.to_owned()))
}
