//! A small HTTP server on loopback that plays the remote side of URL fetching: an image,
//! redirect chains, oversized and slow bodies, and non-images.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// Serves until the test process ends; returns `http://127.0.0.1:PORT`.
///
/// * `/img.png`: `image`
/// * `/redirect/N`: N redirects, then `/img.png`
/// * `/big`: 3 MB announced in `Content-Length`; `/big-chunked`: 3 MB chunked, no length
/// * `/slow`: answers after 5 s
/// * `/text`: `text/plain`; anything else: 404
pub fn start(image: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let image = image.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &image);
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

fn answer(mut stream: TcpStream, image: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let head = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nConnection: close\r\n{extra}\r\n")
    };
    match path.as_str() {
        "/img.png" => {
            stream.write_all(
                head(
                    "200 OK",
                    &format!(
                        "Content-Type: image/png\r\nContent-Length: {}\r\n",
                        image.len()
                    ),
                )
                .as_bytes(),
            )?;
            stream.write_all(image)?;
        }
        "/big" => {
            let total = 3 << 20;
            stream.write_all(head("200 OK", &format!("Content-Length: {total}\r\n")).as_bytes())?;
            let chunk = vec![0u8; 64 << 10];
            for _ in 0..total / chunk.len() {
                stream.write_all(&chunk)?;
            }
        }
        "/big-chunked" => {
            stream.write_all(head("200 OK", "Transfer-Encoding: chunked\r\n").as_bytes())?;
            let chunk = vec![0u8; 64 << 10];
            for _ in 0..48 {
                stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                stream.write_all(&chunk)?;
                stream.write_all(b"\r\n")?;
            }
            stream.write_all(b"0\r\n\r\n")?;
        }
        "/slow" => {
            std::thread::sleep(Duration::from_secs(5));
            stream.write_all(head("200 OK", "Content-Length: 0\r\n").as_bytes())?;
        }
        "/text" => {
            let body = "hello, I am not an image";
            stream.write_all(
                head(
                    "200 OK",
                    &format!(
                        "Content-Type: text/plain\r\nContent-Length: {}\r\n",
                        body.len()
                    ),
                )
                .as_bytes(),
            )?;
            stream.write_all(body.as_bytes())?;
        }
        p if p.starts_with("/redirect/") => {
            let n: u32 = p["/redirect/".len()..].parse().unwrap_or(0);
            let to = if n <= 1 {
                "/img.png".to_owned()
            } else {
                format!("/redirect/{}", n - 1)
            };
            stream.write_all(
                head(
                    "302 Found",
                    &format!("Location: {to}\r\nContent-Length: 0\r\n"),
                )
                .as_bytes(),
            )?;
        }
        _ => {
            stream.write_all(head("404 Not Found", "Content-Length: 0\r\n").as_bytes())?;
        }
    }
    stream.flush()
}
