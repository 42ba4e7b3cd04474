//! How deeply a jq expression nests, measured before jaq parses it.
//!
//! jaq's lexer and parser recurse once per level of nesting, and so does its compiler: an
//! expression such as `((((…1…))))` or `- - - … 1` a few hundred levels deep overflows a
//! 2 MiB thread stack, which aborts the whole process (a queue manager applying a namespace,
//! or checking a trusted request's inline steps). This scan is a conservative over-estimate
//! of that depth, cheap enough to run on every expression first. A chain of binary operators
//! (`1, 1, 1, …`, `.a | .a | …`) recurses the same way, one level per operator, so each
//! operator counts as a level of its chain.

/// Deeper than any expression a person writes; well below what overflows a 2 MiB stack
/// (about 250 levels in a debug build).
pub(super) const MAX_NESTING: usize = 100;

/// What opened a level: a bracket, a string, a string's `\(…)`, `if … end` or `def … ;`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Frame {
    Bracket,
    Object,
    Str,
    Interpolation,
    If,
    Def,
}

/// The nesting depth of `source`: open frames, prefix operators (`-`, `try`, `reduce`,
/// `foreach`) in a row, and binary operators in the same frame, each one level. Unbalanced
/// text is measured as far as it goes; the parser reports what is wrong with it.
pub(super) fn depth(source: &str) -> usize {
    let mut s = Scan::default();
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        if matches!(s.stack.last(), Some((Frame::Str, _))) {
            match c {
                '\\' if chars.peek() == Some(&'(') => {
                    chars.next();
                    s.push(Frame::Interpolation);
                }
                '\\' => {
                    chars.next();
                }
                '"' => s.pop(|_| true),
                _ => {}
            }
        } else {
            match c {
                '#' => {
                    for c in chars.by_ref() {
                        if c == '\n' {
                            break;
                        }
                    }
                }
                '"' => s.push(Frame::Str),
                '(' | '[' => s.push(Frame::Bracket),
                '{' => s.push(Frame::Object),
                ')' | ']' | '}' => {
                    s.pop(|f| matches!(f, Frame::Bracket | Frame::Object | Frame::Interpolation));
                }
                ';' if matches!(s.stack.last(), Some((Frame::Def, _))) => s.pop(|_| true),
                // A new entry of an object, not the comma operator.
                ',' if matches!(s.stack.last(), Some((Frame::Object, _))) => s.chain = 0,
                '-' => s.run += 1,
                '|' | ',' | '+' | '*' | '/' | '%' | '=' | '<' | '>' | '!' | '?' => {
                    s.chain += 1;
                    s.run = 0;
                }
                c if c.is_alphanumeric() || c == '_' || c == '$' || c == '@' => {
                    let mut word = String::from(c);
                    while let Some(&n) = chars.peek() {
                        if n.is_alphanumeric() || n == '_' || n == ':' {
                            word.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    match word.as_str() {
                        "if" => s.push(Frame::If),
                        "def" => s.push(Frame::Def),
                        "end" => s.pop(|f| f == Frame::If),
                        "try" | "reduce" | "foreach" => s.run += 1,
                        "and" | "or" => {
                            s.chain += 1;
                            s.run = 0;
                        }
                        _ => s.run = 0,
                    }
                }
                c if c.is_whitespace() => {}
                _ => s.run = 0,
            }
        }
        s.max = s.max.max(s.base + s.chain + s.run);
    }
    s.max
}

#[derive(Default)]
struct Scan {
    /// Each open frame, and the depth and chain of the frame around it.
    stack: Vec<(Frame, (usize, usize))>,
    base: usize,
    chain: usize,
    run: usize,
    max: usize,
}

impl Scan {
    fn push(&mut self, f: Frame) {
        self.stack.push((f, (self.base, self.chain)));
        self.base += self.chain + self.run + 1;
        self.chain = 0;
        self.run = 0;
    }

    /// Closes the innermost frame when `closes` says this token closes it.
    fn pop(&mut self, closes: impl Fn(Frame) -> bool) {
        if let Some(&(f, (base, chain))) = self.stack.last()
            && closes(f)
        {
            self.stack.pop();
            self.base = base;
            self.chain = chain;
            self.run = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::depth;

    #[test]
    fn measures_nesting() {
        assert_eq!(depth(".a"), 0);
        assert_eq!(depth(".a | .b"), 1);
        assert_eq!(depth("(1)"), 1);
        assert_eq!(depth("[(1), {a: (2), b: 3}]"), 4);
        assert_eq!(depth("- - 1"), 2);
        assert_eq!(depth("if . then (1) else 2 end"), 2);
        assert_eq!(depth(r#""a\(.b)""#), 2);
        assert_eq!(depth(r#""(((((""#), 1);
        assert_eq!(depth("# ((((\n1"), 0);
        assert_eq!(depth("def f: (1); f"), 2);
        assert_eq!(depth(&"1, ".repeat(300)), 300);
        assert_eq!(depth(&"(".repeat(1000)), 1000);
    }
}
