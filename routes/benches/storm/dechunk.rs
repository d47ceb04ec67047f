//! HTTP/1.1 chunked framing taken off a stream as it arrives, for a
//! balancer that re-frames the instance's response.

/// Strips HTTP/1.1 chunked framing, for a balancer that re-frames the
/// stream.
#[derive(Default)]
pub struct Dechunk {
    /// Bytes left in the current chunk; 0 while reading a size line.
    left: usize,
    size_line: Vec<u8>,
    /// After a chunk's data: skipping its CRLF.
    in_crlf: bool,
}

impl Dechunk {
    /// Appends to `out` the data of the chunks in `input`, keeping what a
    /// chunk boundary split for the next call.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.left > 0 {
                let n = self.left.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.left -= n;
                input = &input[n..];
                if self.left == 0 {
                    self.in_crlf = true;
                }
                continue;
            }
            let Some(nl) = input.iter().position(|&b| b == b'\n') else {
                self.size_line.extend_from_slice(input);
                return;
            };
            self.size_line.extend_from_slice(&input[..nl]);
            input = &input[nl + 1..];
            if self.in_crlf {
                self.in_crlf = false;
                self.size_line.clear();
                continue;
            }
            let text = String::from_utf8_lossy(&self.size_line);
            let hex = text.split(';').next().unwrap_or("").trim();
            self.left = usize::from_str_radix(hex, 16).unwrap_or(0);
            self.size_line.clear();
        }
    }
}
