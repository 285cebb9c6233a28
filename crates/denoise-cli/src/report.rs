//! How an error reaches the user: one line, `denoise-cli: <what failed>: <why>`.

/// An error and its causes on one line, `outer: cause: root`, like anyhow's `{:#}` but leaving
/// out a cause whose text the message before it already quotes (the data and model errors put
/// their I/O source in their own message, and also expose it as `source()`).
pub fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_quoted_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::new(denoise_data::DataError::Io {
            path: "a.png".into(),
            source: io,
        })
        .context("loading inputs");
        assert_eq!(
            describe(&err),
            "loading inputs: failed to read 'a.png': No such file"
        );
    }

    #[test]
    fn distinct_causes_are_all_kept() {
        let err = anyhow::anyhow!("root cause")
            .context("middle")
            .context("outer");
        assert_eq!(describe(&err), "outer: middle: root cause");
    }
}
