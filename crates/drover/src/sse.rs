//! A small incremental parser for `text/event-stream` (the subset drover's API emits:
//! `id`, `event`, multi-line `data`, comments).

/// One dispatched SSE message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseMessage {
    pub(crate) id: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) data: String,
}

/// Bytes in, complete messages out. Partial lines wait for the next chunk. A line longer
/// than [`MAX_LINE`] is dropped rather than buffered without bound.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
    overflowed: bool,
}

const MAX_LINE: usize = 1024 * 1024;

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<SseMessage> {
        let mut messages = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                let line = String::from_utf8_lossy(&self.line).trim_end_matches('\r').to_owned();
                self.line.clear();
                if std::mem::take(&mut self.overflowed) {
                    continue;
                }
                if let Some(message) = self.line_done(&line) {
                    messages.push(message);
                }
            } else if self.line.len() < MAX_LINE {
                self.line.push(byte);
            } else {
                self.overflowed = true;
            }
        }
        messages
    }

    fn line_done(&mut self, line: &str) -> Option<SseMessage> {
        if line.is_empty() {
            if self.data.is_empty() {
                self.event = None;
                return None;
            }
            return Some(SseMessage {
                id: self.id.clone(),
                event: self.event.take(),
                data: std::mem::take(&mut self.data).join("\n"),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.id = Some(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "data" => self.data.push(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_across_chunks_are_reassembled() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"id: 7\nevent: run.running\nda").is_empty());
        let messages = parser.push(b"ta: {\"a\":1}\n\n: keep-alive\n\ndata: x\ndata: y\n\n");
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].id.as_deref(), Some("7"));
        assert_eq!(messages[0].event.as_deref(), Some("run.running"));
        assert_eq!(messages[0].data, "{\"a\":1}");
        assert_eq!(messages[1].data, "x\ny");
    }
}
