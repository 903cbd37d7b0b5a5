//! Standard output for every command. `println!` panics when stdout is a closed pipe
//! (`zaya generate | head -c 5`) or a full disk (`> /dev/full`); every write here returns a
//! typed [`OutputError`] instead. `main` turns a closed pipe into a quiet exit with status
//! 0 (what `head` and shell pipelines expect: the reader has all it wanted) and reports any
//! other failure, e.g. "No space left on device", as a clean error.
//!
//! Streaming callbacks cannot return errors (the generation loop calls them), so they write
//! through a [`Sink`], which remembers the first failure and drops later text; the command
//! stops generating at the next token ([`Sink::check`]) and returns the failure.

use std::cell::RefCell;
use std::io::Write;

/// Writing to standard output failed.
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct OutputError(#[source] pub std::io::Error);

impl OutputError {
    /// The reader went away (EPIPE): not a failure of the command.
    pub fn is_closed_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes `text` to stdout and flushes it, so a failure surfaces here and not at exit.
pub fn print(text: &str) -> Result<(), OutputError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).map_err(OutputError)?;
    out.flush().map_err(OutputError)
}

/// [`print`] with a newline.
pub fn println(text: &str) -> Result<(), OutputError> {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    print(&line)
}

/// Whether `err` (any layer of it) is stdout closed by its reader.
pub fn is_closed_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<OutputError>()
            .is_some_and(OutputError::is_closed_pipe)
    })
}

/// Stdout for callbacks that cannot return errors: keeps the first failure.
#[derive(Default)]
pub struct Sink {
    failed: RefCell<Option<OutputError>>,
}

impl Sink {
    /// Writes unless an earlier write failed (then the text is dropped: its reader is gone).
    pub fn write(&self, text: &str) {
        if self.failed.borrow().is_some() {
            return;
        }
        if let Err(e) = print(text) {
            *self.failed.borrow_mut() = Some(e);
        }
    }

    /// Whether a write failed (generation should stop).
    pub fn has_failed(&self) -> bool {
        self.failed.borrow().is_some()
    }

    /// The first failure, if any (taken: a second call returns Ok).
    pub fn check(&self) -> Result<(), OutputError> {
        match self.failed.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Wraps a token chooser so that generation stops as soon as the output it streams to has
/// failed (a closed pipe must not keep the model generating into nowhere).
pub struct StopOnOutputFailure<'s, C> {
    pub inner: C,
    pub sink: &'s Sink,
}

impl<C: zaya::generation::TokenChooser> zaya::generation::TokenChooser
    for StopOnOutputFailure<'_, C>
{
    fn choose(&mut self, row: usize, logits: &[f32], context: &[u32]) -> zaya::Result<(u32, bool)> {
        let (token, stop) = self.inner.choose(row, logits, context)?;
        // Stopping the row (not failing) keeps the library's view simple; the command
        // returns the sink's error once generation has ended.
        Ok((token, stop || self.sink.has_failed()))
    }
}
