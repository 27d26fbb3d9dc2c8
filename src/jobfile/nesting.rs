//! A pre-scan for deep flow nesting (`[` and `{`), run on the text before `serde_yaml` sees it.
//!
//! libyaml, under `serde_yaml`, takes time quadratic in the depth of nested flow collections: it
//! walks its stack of possible simple keys, one entry per open `[` or `{`, for every token. A
//! file of 40,000 `[` (80 KB) takes 11 s to refuse, a few hundred KB would take hours (the same
//! is reported upstream for `serde_yaml` and its forks). `serde_yaml` does refuse documents
//! nested deeper than 128 levels, but only once libyaml has read the whole document. This scan
//! finds the flow depth in one linear pass and refuses a file past [`MAX_FLOW_DEPTH`] before
//! libyaml starts; no valid job file comes near that depth.
//!
//! To tell a bracket that opens a collection from one in text (`prompt: a [red] fox`, quotes,
//! comments, `|` blocks), it follows libyaml's scanner where a token starts: the same rules for
//! plain, quoted and block scalars, comments, and the block indentation that decides where a
//! multi-line scalar ends. Where the text is not YAML libyaml accepts, libyaml stops at the
//! error, so nothing past it costs time; the scan then goes on counting brackets rather than
//! skipping them, so that it never counts fewer than libyaml would see.

/// The deepest flow nesting accepted: the depth at which `serde_yaml` stops anyway.
pub(super) const MAX_FLOW_DEPTH: usize = 128;

/// The byte offset of the first `[` or `{` that opens a flow collection deeper than `limit`, or
/// else the greatest flow depth of `text`.
pub(super) fn scan(text: &str, limit: usize) -> Result<usize, usize> {
    Scanner {
        bytes: text.as_bytes(),
        // libyaml's reader takes a leading byte-order mark as the encoding's, not as a
        // character: it moves no column (one later at a line start does).
        pos: if text.starts_with('\u{feff}') { 3 } else { 0 },
        column: 0,
        index: 0,
        line: 0,
        flow: 0,
        deepest: 0,
        indent: -1,
        indents: Vec::new(),
        key_allowed: true,
        key: None,
    }
    .run(limit)
}

/// The greatest flow nesting (open `[` and `{`) of `text`, as libyaml sees it: for the fuzz
/// target that compares this scan with libyaml. Not a stable interface.
#[doc(hidden)]
#[must_use]
pub fn flow_depth(text: &str) -> usize {
    scan(text, usize::MAX).unwrap_or(usize::MAX)
}

/// A possible simple key of the block context: where a mapping key may have started.
#[derive(Clone, Copy)]
struct Key {
    line: usize,
    index: usize,
    column: isize,
}

/// libyaml's scanner state, as far as it decides where tokens start.
struct Scanner<'t> {
    bytes: &'t [u8],
    pos: usize,
    /// Column (in characters, from 0) of `pos`; signed, as indentations are (-1 for none).
    column: isize,
    /// Characters before `pos`.
    index: usize,
    line: usize,
    /// Open flow collections.
    flow: usize,
    deepest: usize,
    /// The block indentation (-1 outside any block collection) and the enclosing ones.
    indent: isize,
    indents: Vec<isize>,
    /// Whether a simple key may start here (libyaml's `simple_key_allowed`).
    key_allowed: bool,
    /// The possible simple key of the block context (flow level 0). Keys inside flow
    /// collections change no indentation, so they are not tracked.
    key: Option<Key>,
}

impl Scanner<'_> {
    fn run(mut self, limit: usize) -> Result<usize, usize> {
        loop {
            self.skip_to_token();
            if let Some(key) = self.key
                && (key.line < self.line || key.index + 1024 < self.index)
            {
                self.key = None;
            }
            if self.flow == 0 {
                self.unroll(self.column);
            }
            let Some(c) = self.byte(0) else { return Ok(self.deepest) };
            if self.column == 0 && self.document_level(c) {
                continue;
            }
            match c {
                b'[' | b'{' => {
                    self.save_key();
                    self.flow += 1;
                    if self.flow > limit {
                        return Err(self.pos);
                    }
                    self.deepest = self.deepest.max(self.flow);
                    self.key_allowed = true;
                    self.advance();
                }
                b']' | b'}' => {
                    self.remove_key();
                    self.flow = self.flow.saturating_sub(1);
                    self.key_allowed = false;
                    self.advance();
                }
                b',' => {
                    self.remove_key();
                    self.key_allowed = true;
                    self.advance();
                }
                b'-' if self.blankz(1) => {
                    self.roll(self.column);
                    self.remove_key();
                    self.key_allowed = true;
                    self.advance();
                }
                b'?' if self.flow > 0 || self.blankz(1) => {
                    self.roll(self.column);
                    self.remove_key();
                    self.key_allowed = self.flow == 0;
                    self.advance();
                }
                b':' if self.flow > 0 || self.blankz(1) => {
                    self.value();
                    self.advance();
                }
                b'*' | b'&' => {
                    self.save_key();
                    self.key_allowed = false;
                    self.advance();
                    while self
                        .byte(0)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
                    {
                        self.advance();
                    }
                }
                b'!' => {
                    self.save_key();
                    self.key_allowed = false;
                    self.tag();
                }
                b'|' | b'>' if self.flow == 0 => {
                    self.remove_key();
                    self.key_allowed = true;
                    self.block_scalar();
                }
                b'\'' | b'"' => {
                    self.save_key();
                    self.key_allowed = false;
                    self.quoted(c);
                }
                _ if self.plain_start(c) => {
                    self.save_key();
                    self.key_allowed = false;
                    self.plain();
                }
                // A character that starts no token: libyaml stops here; go on counting.
                _ => self.advance(),
            }
        }
    }

    /// A directive (`%YAML 1.2`, the rest of its line) or a document marker (`---`, `...`) at
    /// the start of a line: each ends every block collection. Whether it was one.
    fn document_level(&mut self, c: u8) -> bool {
        let directive = c == b'%';
        if !directive && !self.document_marker() {
            return false;
        }
        if self.flow == 0 {
            self.unroll(-1);
        }
        self.remove_key();
        self.key_allowed = false;
        if directive {
            while !self.breakz(0) {
                self.advance();
            }
        } else {
            for _ in 0..3 {
                self.advance();
            }
        }
        true
    }

    fn byte(&self, ahead: usize) -> Option<u8> {
        self.bytes.get(self.pos + ahead).copied()
    }

    /// The length of the line break at `pos + ahead` (0 if none): `\r\n`, `\r`, `\n`, NEL, LS,
    /// PS, the breaks libyaml knows.
    fn break_len(&self, ahead: usize) -> usize {
        let rest = self.bytes.get(self.pos + ahead..).unwrap_or_default();
        match rest {
            [b'\r', b'\n', ..] | [0xC2, 0x85, ..] => 2,
            [b'\r' | b'\n', ..] => 1,
            [0xE2, 0x80, 0xA8 | 0xA9, ..] => 3,
            _ => 0,
        }
    }

    fn blank(&self, ahead: usize) -> bool {
        matches!(self.byte(ahead), Some(b' ' | b'\t'))
    }

    /// A blank, a line break or the end of the text.
    fn blankz(&self, ahead: usize) -> bool {
        self.byte(ahead).is_none() || self.blank(ahead) || self.break_len(ahead) > 0
    }

    /// A line break or the end of the text.
    fn breakz(&self, ahead: usize) -> bool {
        self.byte(ahead).is_none() || self.break_len(ahead) > 0
    }

    /// Moves over one character (not a line break).
    fn advance(&mut self) {
        let width = match self.byte(0) {
            None => return,
            Some(lead) if lead < 0x80 => 1,
            Some(lead) if lead >= 0xF0 => 4,
            Some(lead) if lead >= 0xE0 => 3,
            Some(_) => 2,
        };
        self.pos = (self.pos + width).min(self.bytes.len());
        self.column += 1;
        self.index += 1;
    }

    /// Moves over the line break at `pos`.
    fn advance_break(&mut self) {
        self.pos += self.break_len(0);
        self.line += 1;
        self.column = 0;
        self.index += 1;
    }

    /// Moves over one character or line break.
    fn advance_any(&mut self) {
        if self.break_len(0) > 0 {
            self.advance_break();
        } else {
            self.advance();
        }
    }

    fn document_marker(&self) -> bool {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        self.column == 0 && (rest.starts_with(b"---") || rest.starts_with(b"...")) && self.blankz(3)
    }

    /// Blanks, then a comment, up to the end of the line (not past it).
    fn skip_blanks_and_comment(&mut self) {
        while self.blank(0) {
            self.advance();
        }
        if self.byte(0) == Some(b'#') {
            while !self.breakz(0) {
                self.advance();
            }
        }
    }

    /// Blanks, comments and line breaks up to the next token (libyaml's
    /// `scan_to_next_token`). Tabs are skipped everywhere: where libyaml refuses one, what
    /// follows does not matter.
    fn skip_to_token(&mut self) {
        loop {
            if self.column == 0 && self.bytes[self.pos..].starts_with(b"\xEF\xBB\xBF") {
                self.advance();
            }
            self.skip_blanks_and_comment();
            if self.break_len(0) == 0 {
                return;
            }
            self.advance_break();
            if self.flow == 0 {
                self.key_allowed = true;
            }
        }
    }

    fn save_key(&mut self) {
        if self.key_allowed && self.flow == 0 {
            self.key = Some(Key { line: self.line, index: self.index, column: self.column });
        }
    }

    fn remove_key(&mut self) {
        if self.flow == 0 {
            self.key = None;
        }
    }

    /// A block collection starts at `column` if it is deeper than the current one.
    fn roll(&mut self, column: isize) {
        if self.flow == 0 && self.indent < column {
            self.indents.push(self.indent);
            self.indent = column;
        }
    }

    /// Block collections deeper than `column` end.
    fn unroll(&mut self, column: isize) {
        while self.indent > column {
            self.indent = self.indents.pop().unwrap_or(-1);
        }
    }

    /// A `:` value indicator: a possible simple key before it makes a mapping start there.
    fn value(&mut self) {
        if self.flow > 0 {
            self.key_allowed = false;
        } else if let Some(key) = self.key.take() {
            self.roll(key.column);
            self.key_allowed = false;
        } else {
            self.roll(self.column);
            self.key_allowed = true;
        }
    }

    /// Whether `c` starts a plain scalar here (libyaml's test, negated for indicators).
    fn plain_start(&self, c: u8) -> bool {
        let indicator = matches!(
            c,
            b'-' | b'?'
                | b':'
                | b','
                | b'['
                | b']'
                | b'{'
                | b'}'
                | b'#'
                | b'&'
                | b'*'
                | b'!'
                | b'|'
                | b'>'
                | b'\''
                | b'"'
                | b'%'
                | b'@'
                | b'`'
        );
        !(self.blankz(0) || indicator)
            || (c == b'-' && !self.blank(1))
            || (self.flow == 0 && matches!(c, b'?' | b':') && !self.blankz(1))
    }

    /// A plain scalar, over as many lines as it continues (libyaml's `scan_plain_scalar`).
    fn plain(&mut self) {
        let indent = self.indent + 1;
        let mut leading_blanks = false;
        loop {
            if self.document_marker() || self.byte(0) == Some(b'#') {
                break;
            }
            while let Some(c) = self.byte(0).filter(|_| !self.blankz(0)) {
                if self.flow > 0
                    && c == b':'
                    && matches!(self.byte(1), Some(b',' | b'?' | b'[' | b']' | b'{' | b'}'))
                {
                    // libyaml refuses this `:`; carry on from it.
                    return;
                }
                let ends = (c == b':' && self.blankz(1))
                    || (self.flow > 0 && matches!(c, b',' | b'[' | b']' | b'{' | b'}'));
                if ends {
                    break;
                }
                self.advance();
            }
            if !(self.blank(0) || self.break_len(0) > 0) {
                break;
            }
            while self.blank(0) || self.break_len(0) > 0 {
                leading_blanks |= self.break_len(0) > 0;
                self.advance_any();
            }
            if self.flow == 0 && self.column < indent {
                break;
            }
        }
        if leading_blanks {
            self.key_allowed = true;
        }
    }

    /// A single- or double-quoted scalar, to its closing quote.
    fn quoted(&mut self, quote: u8) {
        self.advance();
        loop {
            let Some(c) = self.byte(0) else { return };
            if self.document_marker() {
                // libyaml refuses a document marker inside quotes; carry on from it.
                return;
            }
            match c {
                b'\'' if quote == b'\'' && self.byte(1) == Some(b'\'') => {
                    self.advance();
                    self.advance();
                }
                b'\\' if quote == b'"' => {
                    self.advance();
                    self.advance_any();
                }
                _ if c == quote => {
                    self.advance();
                    return;
                }
                _ => self.advance_any(),
            }
        }
    }

    /// A tag (`!name`, `!!str`, `!<verbatim>`).
    fn tag(&mut self) {
        self.advance();
        if self.byte(0) == Some(b'<') {
            while !self.blankz(0) && self.byte(0) != Some(b'>') {
                self.advance();
            }
            self.advance();
            return;
        }
        while self
            .byte(0)
            .is_some_and(|c| c.is_ascii_alphanumeric() || b"-_;/?:@&=+$.%!~*'()".contains(&c))
        {
            self.advance();
        }
    }

    /// A literal (`|`) or folded (`>`) block scalar: its header, then every line indented at
    /// least as far as its content (libyaml's `scan_block_scalar`).
    fn block_scalar(&mut self) {
        self.advance();
        let mut increment = 0;
        let digit = |c: Option<u8>| c.filter(u8::is_ascii_digit).map(|c| isize::from(c - b'0'));
        if matches!(self.byte(0), Some(b'+' | b'-')) {
            self.advance();
            if let Some(value) = digit(self.byte(0)) {
                increment = value;
                self.advance();
            }
        } else if let Some(value) = digit(self.byte(0)) {
            increment = value;
            self.advance();
            if matches!(self.byte(0), Some(b'+' | b'-')) {
                self.advance();
            }
        }
        self.skip_blanks_and_comment();
        if self.break_len(0) == 0 {
            // Something after the header, or the end: libyaml refuses or ends the scalar.
            return;
        }
        self.advance_break();
        let mut indent = match increment {
            0 => 0,
            _ if self.indent >= 0 => self.indent + increment,
            _ => increment,
        };
        self.block_breaks(&mut indent);
        while self.column == indent && self.byte(0).is_some() {
            while !self.breakz(0) {
                self.advance();
            }
            if self.byte(0).is_none() {
                return;
            }
            self.advance_break();
            self.block_breaks(&mut indent);
        }
    }

    /// Blank lines and the indentation of the next line of a block scalar; sets `indent` from
    /// them when the header gave none.
    fn block_breaks(&mut self, indent: &mut isize) {
        let mut max_indent = 0;
        loop {
            while (*indent == 0 || self.column < *indent) && self.byte(0) == Some(b' ') {
                self.advance();
            }
            max_indent = max_indent.max(self.column);
            if self.break_len(0) == 0 {
                break;
            }
            self.advance_break();
        }
        if *indent == 0 {
            *indent = max_indent.max(self.indent + 1).max(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth(text: &str) -> usize {
        scan(text, usize::MAX).expect("no limit")
    }

    #[test]
    fn brackets_in_text_are_not_nesting() {
        for text in [
            "prompt: a [red] fox {or} two [[[\n",
            "prompt: \"[[[ {{\"\n",
            "prompt: '[[[ it''s {'\n",
            "# [[[ {{{\nprompt: a # [[[\n",
            "prompt: |\n  [[[\n    {{{\n  more [\nname: x\n",
            "prompt: >-\n  folded [[[\n\n  [[[\n",
            "a: text\n  [[[ continued\n  {{ more\nb: c\n",
            "- plain [[[\n- x[y\n",
            "prompt: !tag x[y\n",
            "a: \"multi\n  line [[[\n  quoted\"\n",
            "a: \"esc \\\" [[[\"\n",
        ] {
            assert_eq!(depth(text), 0, "{text:?}");
        }
    }

    #[test]
    fn flow_collections_are_counted() {
        assert_eq!(depth("params: {a: [1, [2, {b: c}]]}\n"), 4);
        assert_eq!(depth("{jobs: [{prompt: \"[\", params: {x: [[1]]}}]}\n"), 6);
        assert_eq!(depth("[a]: [[b]]\n"), 2);
        assert_eq!(depth("a: [\n\"]\"\n, [\n]]\n"), 2);
        assert_eq!(depth("a: [x # ]]]\n, [y]]\n"), 2);
        assert_eq!(depth("a: ['it''s ]', [x]]\n"), 2);
        assert_eq!(depth(&format!("x: {}{}\n", "[".repeat(300), "]".repeat(300))), 300);
    }

    #[test]
    fn block_scalars_end_where_libyaml_ends_them() {
        // The block scalar under `a` ends at `b`, indented as `a` is.
        assert_eq!(depth("- a: |\n    x\n  b: [[[]]]\n"), 3);
        assert_eq!(depth("a: |\n  x\nb: [[1]]\n"), 2);
        // Explicit indentation: content is 2 past the mapping's indentation.
        assert_eq!(depth("a:\n  b: |2\n     [[[ text\n  c: [1]\n"), 1);
        assert_eq!(depth("a: |\n\n\n  x [\n\n  y [\nb: [{c: 1}]\n"), 2);
    }

    #[test]
    fn plain_scalars_end_where_libyaml_ends_them() {
        // A quote that continues a plain scalar is text: what follows it is not quoted.
        assert_eq!(depth("a: x\n \"\nb: [[[[]]]]\n   \"\n"), 4);
        // A line indented as the key is not a continuation.
        assert_eq!(depth("a: x\nb: [[1]]\n"), 2);
        assert_eq!(depth("- a: x\n  b: [[1]]\n"), 2);
        // In a flow collection, a plain scalar stops at brackets.
        assert_eq!(depth("a: [x[y]]\n"), 2);
    }

    #[test]
    fn a_leading_byte_order_mark_moves_no_column() {
        // Found by the `flow_depth` fuzz target: with the mark counted as a column, the key
        // moved to column 1 and the quote below stopped being a continuation of `x`.
        assert_eq!(depth("\u{feff}a: x\n \"\nb: [[[[]]]]\n   \"\n"), 4);
    }

    #[test]
    fn a_directive_ends_every_block() {
        // Found by the `flow_depth` fuzz target: after the directive the indentation is -1, so
        // the line after `~x` continues that plain scalar, brackets and all.
        assert_eq!(depth("a: x\n%YAML 1.2\n~x\n, {   [\n"), 0);
    }

    #[test]
    fn the_limit_points_at_the_bracket_past_it() {
        let text = format!("a: {}", "[".repeat(200));
        assert_eq!(scan(&text, 128), Err(3 + 128));
        assert_eq!(scan("a: [[1]]", 2), Ok(2));
        assert_eq!(scan("a: [[[1]]]", 2), Err(5));
    }

    #[test]
    fn the_scan_is_linear() {
        let text = "[".repeat(4 << 20);
        let started = std::time::Instant::now();
        assert_eq!(scan(&text, usize::MAX), Ok(4 << 20));
        let lines = "  - prompt: \"a fox [in] {snow}\" # [[\n".repeat(100_000);
        assert_eq!(scan(&lines, usize::MAX), Ok(0));
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    }
}
