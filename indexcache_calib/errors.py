"""One exception type for everything the user can fix; the CLI turns it into `Error:`/`Hint:` lines."""

# Exit codes. 2 is what typer uses for bad command lines too.
EXIT_BAD_INPUT = 2
EXIT_RESUME_MISMATCH = 3
EXIT_OUT_OF_MEMORY = 4


class Terminated(Exception):
    """SIGTERM, raised by the command line's handler so that a long run can save what it has and stop."""


class CalibError(Exception):
    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError and the CPU allocator's RuntimeError alike: an
    allocation that failed is out of memory wherever it happens."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def plural(n: int, word: str, words: str | None = None) -> str:
    """`n word` in messages, the noun plural unless n is 1: plural(1, "step") is "1 step", plural(3, "Full layer")
    "3 Full layers"; irregular nouns give their plural: plural(2, "query", "queries")."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def check_resume_overwrite(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise CalibError("--resume and --overwrite contradict each other: one continues the run in --out, the other "
                         "deletes it", hint="pass --resume to continue the run, or --overwrite to start again")
