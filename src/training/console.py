"""train.log: the console's lines, kept in the run directory.

train.py replaces sys.stdout and sys.stderr by tees before anything else is imported, so every
line printed (ours, Lightning's and DeepSpeed's log lines, warnings) also reaches the log. Lines
wait in memory until the run is accepted (run.json written): a refused run leaves its directory
as it was. From then on each complete line is appended with one write to a file opened
O_APPEND, so a killed run's log holds every line printed up to then; no temporary is involved,
and only the process holding the run's lock writes. The progress bar redraws one line with
carriage returns: the log gets the line's final state, and meanwhile its state once a minute,
never every redraw. Output written below Python (C libraries) is not seen."""
import os
import socket
import sys
import time
import traceback

EVERY = 60.0    # seconds between two states of a redrawn line in the log


class ConsoleLog:
    def __init__(self, command, every=EVERY):
        self.command, self.every = command, every
        self.fd, self.pending = None, []
        self.streams = (sys.stdout, sys.stderr)
        self.tees = (_Tee(sys.stdout, self), _Tee(sys.stderr, self))
        sys.stdout, sys.stderr = self.tees

    def open(self, path, resume):
        """Start appending to `path`: a separator line, the command, then the lines held so far."""
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        again = os.fstat(self.fd).st_size > 0
        start = (f"{'=' * 20} train.py {'resumed' if resume else 'started'} {time.strftime('%Y-%m-%d %H:%M:%S')} "
                 f"on {socket.gethostname()} (pid {os.getpid()}) {'=' * 20}\n")
        self._write(("\n" if again else "") + start + f"$ {self.command}\n" + "".join(self.pending))
        self.pending = []

    def line(self, text):
        text = text.rstrip() + "\n"
        if self.fd is None:
            self.pending.append(text)
        else:
            self._write(text)

    def stopped(self, error):
        """What ends the run with an error, in the log (the interpreter prints it after the log is closed)."""
        if self.fd is None or isinstance(error, (KeyboardInterrupt, SystemExit)):
            return
        if isinstance(error, (ValueError, FileNotFoundError)):      # train.py's one-sentence errors
            self.line(f"train.py: {error}")
        else:
            self._write("".join(traceback.format_exception(error)))

    def close(self):
        """Stop logging (the tees keep forwarding: loggers made meanwhile hold them) and give the
        streams back. Lines of a refused run, never opened, are dropped."""
        for tee in self.tees:
            tee.finish()
            tee.log = None
        if self.fd is not None:
            os.close(self.fd)
        self.fd, self.pending = None, []
        if sys.stdout is self.tees[0]:
            sys.stdout = self.streams[0]
        if sys.stderr is self.tees[1]:
            sys.stderr = self.streams[1]

    def _write(self, text):
        data = text.encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass    # a full disk: the run itself says so; a log never stops it


class _Tee:
    """A text stream that writes through to `stream` and hands each finished line to the log."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log
        self.partial, self.redrawn, self.shown = "", "", 0.0

    def write(self, text):
        n = self.stream.write(text)
        if self.log is not None:
            self.partial += text
            while True:
                ends = [i for i in (self.partial.find("\n"), self.partial.find("\r")) if i >= 0]
                if not ends:
                    break
                i = min(ends)
                line, end, self.partial = self.partial[:i], self.partial[i], self.partial[i + 1:]
                if end == "\n":
                    if line or not self.redrawn:
                        self.log.line(line)
                    else:
                        self.log.line(self.redrawn)     # "\r\n": the line ends in its last state
                    self.redrawn = ""
                elif line.strip():
                    self.redrawn = line
                    if time.monotonic() - self.shown >= self.log.every:
                        self.shown = time.monotonic()
                        self.log.line(line)
        return n

    def finish(self):
        """The last unfinished line, as it stands."""
        if self.log is not None and (self.partial.strip() or self.redrawn):
            self.log.line(self.partial if self.partial.strip() else self.redrawn)
        self.partial, self.redrawn = "", ""

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):    # fileno, isatty, encoding...: the stream's own
        return getattr(self.stream, name)
