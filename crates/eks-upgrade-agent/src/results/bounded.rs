//! A `BufRead` adapter in front of quick-xml that bounds what one XML event can hold.
//! quick-xml buffers a whole event (a text node, a CDATA section, a comment, a tag with its
//! attributes), so one 50 MB `<system-out>` would be 50 MB of memory. This adapter cuts every
//! text, CDATA, comment and attribute value run after [`MAX_RUN_BYTES`] and puts
//! [`TRUNCATED`] where the rest was, keeping the XML well-formed: it never cuts inside an
//! entity reference (`&amp;`) or a UTF-8 sequence, and keeps the quotes, the `]]>` and the
//! `-->` that close what it cut. Tags, processing instructions and declarations longer than
//! [`MAX_MARKUP_BYTES`] (outside their bounded values) are refused as an I/O error.

use std::io::{self, BufRead, Read};

/// Longest text, CDATA, comment or attribute value run passed on (messages keep far less:
/// [`crate::model::MAX_MESSAGE_BYTES`]).
pub(crate) const MAX_RUN_BYTES: usize = 256 * 1024;
/// Longest tag (its attribute values included, each bounded), processing instruction or
/// declaration.
pub(crate) const MAX_MARKUP_BYTES: usize = 4 * 1024 * 1024;
/// Put where a run was cut.
pub(crate) const TRUNCATED: &str = "…(truncated)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Text,
    /// After `<`.
    Lt,
    /// After `<!`, with how much of `[CDATA[` matched.
    Bang(u8),
    /// After `<!-`.
    BangDash,
    /// In a tag; the quote of the attribute value being read, if any.
    Tag(u8),
    /// In a comment, with the `-` seen in a row.
    Comment(u8),
    /// In CDATA, with the `]` seen in a row.
    CData(u8),
    /// In a processing instruction; whether the last byte was `?`.
    Pi(bool),
    /// In a declaration (`<!DOCTYPE ...>`): `[` depth and the open quote.
    Decl(u32, u8),
}

/// See the module.
pub(crate) struct Bounded<R> {
    inner: R,
    out: Vec<u8>,
    pos: usize,
    st: St,
    /// Bytes of the current run passed on.
    run: usize,
    /// Dropping the rest of the current run.
    cut: bool,
    /// Inside `&...;`, since this many bytes of the run.
    entity: Option<usize>,
    /// Bytes of the current markup.
    markup: usize,
    /// Newlines dropped so far (line numbers of later errors add them).
    pub(crate) dropped_lines: u64,
    /// Whether anything was cut.
    pub(crate) truncated: bool,
}

const CDATA: &[u8] = b"[CDATA[";

impl<R: BufRead> Bounded<R> {
    pub(crate) fn new(inner: R) -> Bounded<R> {
        Bounded {
            inner,
            out: Vec::with_capacity(64 * 1024),
            pos: 0,
            st: St::Text,
            run: 0,
            cut: false,
            entity: None,
            markup: 0,
            dropped_lines: 0,
            truncated: false,
        }
    }

    fn start_run(&mut self) {
        self.run = 0;
        self.cut = false;
        self.entity = None;
    }

    /// One byte of a bounded run: passed on, or dropped once the run is over its bound (at a
    /// character boundary, outside an entity reference).
    fn content(&mut self, b: u8) {
        if self.cut {
            if b == b'\n' {
                self.dropped_lines += 1;
            }
            return;
        }
        let continuation = (0x80..0xC0).contains(&b);
        if let Some(at) = self.entity
            && (b == b';' || self.run - at > 64)
        {
            self.entity = None;
            self.out.push(b);
            self.run += 1;
            return;
        }
        if self.run >= MAX_RUN_BYTES && !continuation && self.entity.is_none() {
            self.cut = true;
            self.truncated = true;
            self.out.extend_from_slice(TRUNCATED.as_bytes());
            if b == b'\n' {
                self.dropped_lines += 1;
            }
            return;
        }
        if b == b'&' {
            self.entity = Some(self.run);
        }
        self.out.push(b);
        self.run += 1;
    }

    fn markup_byte(&mut self, b: u8) -> io::Result<()> {
        self.out.push(b);
        self.markup += 1;
        if self.markup > MAX_MARKUP_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a tag or declaration longer than {} MiB (not a report this reader takes)",
                    MAX_MARKUP_BYTES / (1024 * 1024)
                ),
            ));
        }
        Ok(())
    }

    /// After `<!` and `b`, not a comment or CDATA: a declaration (or `<!>`, back to text).
    fn declaration(&mut self, b: u8) {
        self.st = St::Decl(u32::from(b == b'['), 0);
        if b == b'>' {
            self.st = St::Text;
            self.start_run();
        }
    }

    fn byte(&mut self, b: u8) -> io::Result<()> {
        match self.st {
            St::Text => {
                if b == b'<' {
                    self.out.push(b);
                    self.st = St::Lt;
                    self.markup = 1;
                } else {
                    self.content(b);
                }
            }
            St::Lt => {
                self.markup_byte(b)?;
                self.st = match b {
                    b'!' => St::Bang(0),
                    b'?' => St::Pi(false),
                    b'>' => St::Text,
                    _ => St::Tag(0),
                };
                if self.st == St::Text {
                    self.start_run();
                }
            }
            St::Bang(n) => {
                self.markup_byte(b)?;
                let n = n as usize;
                if n == 0 && b == b'-' {
                    self.st = St::BangDash;
                } else if n < CDATA.len() && CDATA[n] == b {
                    if n + 1 == CDATA.len() {
                        self.st = St::CData(0);
                        self.start_run();
                    } else {
                        self.st = St::Bang(n as u8 + 1);
                    }
                } else {
                    self.declaration(b);
                }
            }
            St::BangDash => {
                self.markup_byte(b)?;
                if b == b'-' {
                    self.st = St::Comment(0);
                    self.start_run();
                } else {
                    self.declaration(b);
                }
            }
            St::Tag(0) => {
                self.markup_byte(b)?;
                match b {
                    b'"' | b'\'' => {
                        self.st = St::Tag(b);
                        self.start_run();
                    }
                    b'>' => {
                        self.st = St::Text;
                        self.start_run();
                    }
                    _ => {}
                }
            }
            St::Tag(q) => {
                if b == q {
                    self.markup_byte(b)?;
                    self.st = St::Tag(0);
                } else {
                    let before = self.out.len();
                    self.content(b);
                    self.markup += self.out.len() - before;
                }
            }
            St::Comment(dashes) => {
                if b == b'>' && dashes >= 2 {
                    if self.cut {
                        self.out.extend_from_slice(b"-->");
                    } else {
                        self.out.push(b);
                    }
                    self.st = St::Text;
                    self.start_run();
                } else {
                    self.st = St::Comment(if b == b'-' {
                        dashes.saturating_add(1)
                    } else {
                        0
                    });
                    // No entities in comments.
                    self.entity = None;
                    if b != b'&' {
                        self.content(b);
                    } else if !self.cut {
                        self.out.push(b);
                        self.run += 1;
                    }
                }
            }
            St::CData(brackets) => {
                if b == b'>' && brackets >= 2 {
                    if self.cut {
                        self.out.extend_from_slice(b"]]>");
                    } else {
                        self.out.push(b);
                    }
                    self.st = St::Text;
                    self.start_run();
                } else {
                    self.st = St::CData(if b == b']' {
                        brackets.saturating_add(1)
                    } else {
                        0
                    });
                    self.entity = None;
                    if b != b'&' {
                        self.content(b);
                    } else if !self.cut {
                        self.out.push(b);
                        self.run += 1;
                    }
                }
            }
            St::Pi(question) => {
                self.markup_byte(b)?;
                self.st = if question && b == b'>' {
                    self.start_run();
                    St::Text
                } else {
                    St::Pi(b == b'?')
                };
            }
            St::Decl(depth, quote) => {
                self.markup_byte(b)?;
                self.st = match (b, quote) {
                    (b'"' | b'\'', 0) => St::Decl(depth, b),
                    (_, q) if q != 0 => St::Decl(depth, if b == q { 0 } else { q }),
                    (b'[', _) => St::Decl(depth + 1, 0),
                    (b']', _) => St::Decl(depth.saturating_sub(1), 0),
                    (b'>', _) if depth == 0 => {
                        self.start_run();
                        St::Text
                    }
                    _ => St::Decl(depth, 0),
                };
            }
        }
        Ok(())
    }
}

impl<R: BufRead> BufRead for Bounded<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.out.len() {
            self.out.clear();
            self.pos = 0;
            let chunk = self.inner.fill_buf()?;
            if chunk.is_empty() {
                return Ok(&[]);
            }
            let n = chunk.len().min(64 * 1024);
            let bytes = chunk[..n].to_vec();
            self.inner.consume(n);
            for b in bytes {
                self.byte(b)?;
            }
        }
        Ok(&self.out[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.out.len());
    }
}

impl<R: BufRead> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let avail = self.fill_buf()?;
            let n = avail.len().min(buf.len());
            buf[..n].copy_from_slice(&avail[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(text: &str) -> String {
        let mut out = String::new();
        Bounded::new(text.as_bytes())
            .read_to_string(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn short_documents_pass_unchanged() {
        for doc in [
            "<?xml version=\"1.0\"?>\n<!DOCTYPE x [<!ENTITY a \"b\">]><a b=\"1 &amp; 2\" c='>'>t &lt; x<!-- c - d --><![CDATA[ ]] > ]]></a>",
            "<testsuite><testcase name=\"é\"><failure>ü &#233;</failure></testcase></testsuite>",
        ] {
            assert_eq!(through(doc), doc);
        }
    }

    #[test]
    fn long_runs_are_cut_well_formed() {
        let long = "é".repeat(MAX_RUN_BYTES); // two bytes each: twice the bound
        let amp = format!("{}&amp;{}", "a".repeat(MAX_RUN_BYTES - 2), "b".repeat(100));
        for (doc, keeps) in [
            (format!("<a>{long}</a>"), "</a>"),
            (format!("<a><![CDATA[{long}]]></a>"), "]]></a>"),
            (format!("<a><!--{long}--></a>"), "--></a>"),
            (format!("<a m=\"{long}\" n='x'/>"), "\" n='x'/>"),
            (format!("<a>{amp}</a>"), "&amp;"),
        ] {
            let out = through(&doc);
            assert!(out.len() < MAX_RUN_BYTES + 100, "{}", out.len());
            assert!(out.contains(TRUNCATED), "{}", &out[out.len() - 40..]);
            assert!(out.contains(keeps), "{}", &out[out.len() - 40..]);
            // Still well-formed (and valid UTF-8: `through` read it as a String).
            let mut r = quick_xml::Reader::from_str(&out);
            while r.read_event().unwrap() != quick_xml::events::Event::Eof {}
        }
    }

    /// A comment or CDATA opener split across the chunks read (where `out` is cleared) is
    /// still read as one: the long text after a comment holding a quote is cut as a run.
    #[test]
    fn openers_split_across_chunks_are_matched() {
        use std::io::BufReader;
        let long = "x".repeat(MAX_RUN_BYTES + 10);
        for doc in [
            format!("<a><!-- it's --><b>{long}</b></a>"),
            format!("<a><![CDATA[ it's ]]><b>{long}</b></a>"),
        ] {
            let whole = through(&doc);
            assert!(whole.contains(TRUNCATED));
            for split in 1..16 {
                let (a, b) = doc.as_bytes().split_at(split);
                let mut out = String::new();
                Bounded::new(BufReader::new(a.chain(b)))
                    .read_to_string(&mut out)
                    .unwrap();
                assert!(out == whole, "split at {split}: {}", &doc[..16]);
            }
        }
    }

    #[test]
    fn overlong_markup_is_refused() {
        let attrs: String = (0..(MAX_MARKUP_BYTES / 10))
            .map(|i| format!(" a{i}=\"\""))
            .collect();
        let mut out = Vec::new();
        let e = Bounded::new(format!("<a{attrs}/>").as_bytes())
            .read_to_end(&mut out)
            .unwrap_err();
        assert!(e.to_string().contains("longer than 4 MiB"), "{e}");
    }
}
