"""Is a failure worth retrying? One answer for both runners (Airflow in-process and spark-submit).

Retryable: a cause outside the night's inputs that may be gone in a few minutes: storage and network errors
(OSError, ConnectionError, TimeoutError, S3 5xx / SlowDown / throttling, pyarrow's "AWS Error NETWORK_CONNECTION",
botocore's EndpointConnectionError), a date another run holds, a lost executor or a Spark context that was shut
down. Permanent: everything else, which a retry would only repeat: bad input, a failed gate, a config error, a
schema mismatch, a model error, a missing file, denied access, and any error not known to be transient (most likely
a bug, and said so in the message).

The cause is looked for however deep it was raised: along `__cause__` / `__context__` (a context suppressed with
`raise ... from None` was judged by whoever raised, and is not looked at), and in the text of every exception on the
way, because an error raised on an executor reaches the driver as a PySpark PythonException or a py4j
Py4JJavaError whose message holds the executor's Python traceback and the JVM's stack trace. Any retryable sign
makes the whole failure retryable: a retry costs minutes, a night lost to a network blip costs a day.

Pure: no Spark, py4j, botocore or Airflow import; exceptions are recognised by their class names. In matcher/ so
that steps can use it too (an image read that fails for a storage outage is not a bad image)."""
from __future__ import annotations

import re
from dataclasses import dataclass

# Exception classes (by name, on any class of the exception's MRO, or named in a traceback's text) that mean a
# transient storage, network or cluster failure.
_RETRYABLE_NAMES = frozenset({
    # Python
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError",
    "TimeoutError", "gaierror", "IncompleteRead", "RemoteDisconnected",
    # botocore / urllib3 / requests
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "NewConnectionError", "ProtocolError", "ResponseStreamingError",
    # matcher: another run holds the date; another process runs the embedded S3 server on the same folder; the
    # catalog's producer has not written its ready marker yet
    "DateLockedError", "S3ServerBusy", "CatalogNotReady",
    # py4j: the driver lost its JVM
    "Py4JNetworkError",
    # JVM (Spark, Netty, Hadoop S3A, the AWS SDKs)
    "ConnectException", "SocketTimeoutException", "SocketException", "NoRouteToHostException", "UnknownHostException",
    "TimeoutException", "RpcTimeoutException", "FetchFailedException", "AnnotatedConnectException",
    "ClosedChannelException", "ConnectTimeoutException", "NoHttpResponseException", "SdkClientException",
    "AWSClientIOException", "AWSServiceThrottledException", "AWSStatus500Exception", "AWSNoResponseException",
})

# OSError and the names above are retryable unless they say one of these: the request reached the storage and was
# refused for a reason a retry cannot change (credentials, a missing bucket or key), or the bytes are not what they
# should be (a corrupt file).
_PERMANENT_OS_ERRORS = frozenset({"FileNotFoundError", "PermissionError", "IsADirectoryError", "NotADirectoryError",
                                  "FileExistsError", "UnidentifiedImageError", "BadGzipFile",
                                  "SSLCertVerificationError"})
# S3's answer to a request signed for another region than the bucket's: storage.s3_region is wrong.
_WRONG_REGION = re.compile(r"HTTP status 301|\bPermanentRedirect\b|configured region is")
_PERMANENT_STORAGE = re.compile(
    r"AWS Error (?:ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|NO_SUCH_BUCKET|NO_SUCH_KEY|"
    r"NO_SUCH_UPLOAD|RESOURCE_NOT_FOUND|MISSING_AUTHENTICATION_TOKEN|INVALID_PARAMETER\w*|VALIDATION)"
    r"|HTTP status 4(?!08|29)\d\d|\bStatus Code: 4(?!08|29)\d\d"
    r"|" + _WRONG_REGION.pattern +
    r"|\bAccessDenied\b|\bNoSuchBucket\b|\bNoSuchKey\b|\bInvalidAccessKeyId\b|\bSignatureDoesNotMatch\b"
    r"|No such file or directory|Permission denied|Path does not exist|Not a gzip file|inflate failed"
    r"|incorrect header check|cannot identify image file|magic bytes|[Cc]orrupt", re.ASCII)

# Signs of a transient failure anywhere in a message, whatever the exception's class: the wording of network
# errors (Python's, curl's through pyarrow, the JVM's), S3's retryable answers, and Spark's lost executors.
_RETRYABLE_TEXT = [
    (re.compile(r"ExecutorLostFailure|Executor heartbeat timed out|\bexecutor \S+ (?:lost|exited)\b|"
                r"\bLost executor\b|Python worker exited unexpectedly|Python worker failed to connect back"),
     "an executor or its Python worker was lost"),
    (re.compile(r"SparkContext (?:was shut down|has been shutdown|is stopped|has been stopped)|"
                r"stopped SparkContext|Answer from Java side is empty|Error while (?:receiving|sending)|"
                r"Failed to connect to master|All masters are unresponsive"),
     "Spark (its context, JVM or cluster) went away"),
    (re.compile(r"\bFetchFailed"), "a shuffle fetch failed"),
    (re.compile(r"AWS Error (?:NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|THROTTLING|"
                r"REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED|UNKNOWN \(HTTP status 5\d\d\))|HTTP status 5\d\d|"
                r"Status Code: 5\d\d|\((?:SlowDown|ServiceUnavailable|InternalError|RequestTimeout|Throttling|"
                r"ThrottlingException|RequestLimitExceeded|500|502|503|504)\)|\bSlowDown\b|\bSlow Down\b"),
     "the object store was unavailable or throttling"),
    (re.compile(r"Connection refused|Connection reset|Connection timed out|Connection aborted|connect timed out|"
                r"Read timed out|Broken pipe|Network is unreachable|No route to host|"
                r"Temporary failure in name resolution|Could not connect to the endpoint|Unable to execute HTTP "
                r"request|Couldn't connect to server|curlCode: (?:6|7|28|52|55|56)\b", re.IGNORECASE),
     "a network failure"),
]

# An exception named in a traceback or a JVM stack trace: `OSError: ...`, `java.net.ConnectException: ...`,
# `Caused by: org.apache...`, also mid-line after ": " as in Spark's "Lost task 0.0 (TID 0) (host executor 1): X: ...".
_EXCEPTION_NAME = re.compile(r"(?:^|: )((?:[a-z_]\w*\.)*[A-Z][\w$]*(?:Error|Exception|Failure))(?=: |:?$)")

# Known permanent kinds (by class, or by name in an executor's traceback), named as such in the message. Any other
# error not known to be transient is reported as most likely a bug.
_INPUT_OR_CONFIG = frozenset({
    "ValueError", "ConfigError", "CatalogError", "StorageError", "ModelError", "EncoderError", "NotPublishedError",
    "FileNotFoundError", "PermissionError", "UnicodeDecodeError", "JSONDecodeError", "ArrowInvalid",
    "ArrowTypeError", "AnalysisException", "FileNotFoundException", "AccessDeniedException"})
_SPARK_WRAPPERS = frozenset({"PythonException", "Py4JJavaError", "CapturedException", "UnknownException"})


# Exit statuses of matcher's commands (`matcher run`, jobs/submit.py), so a scheduler can tell a retry from a failure.
EXIT_OK = 0
EXIT_PERMANENT = 1
EXIT_USAGE = 2
EXIT_RETRYABLE = 75  # os.EX_TEMPFAIL (sysexits.h), spelled out: os.EX_TEMPFAIL is missing on Windows
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports a command SIGINT ended
EXIT_BROKEN_PIPE = 141  # stdout's reader gone, as a shell reports a command SIGPIPE ended


@dataclass(frozen=True)
class Failure:
    """retryable: a retry may succeed. summary: `Type: message` of the exception that decided (for an executor's
    error, the executor's own exception, not Spark's wrapper), one line. why: the kind of cause, in words; empty
    for a StageError, whose message (a stage's own verdict) says it."""
    retryable: bool
    summary: str
    why: str

    def message(self, limit: int = 500) -> str:
        """One line for a log or an exception: the summary and why it will or will not be retried."""
        if not self.why:
            return self.summary  # a stage sized its own message
        tail = f" [retryable: {self.why}]" if self.retryable else f" [not retried: {self.why}]"
        return self.summary[:limit] + tail


def classify(exc: BaseException) -> Failure:
    """Retryable or permanent, by every cause on exc's chain (see the module's docstring)."""
    chain = _chain(exc)
    for link in chain:
        if "StageError" in _class_names(link):  # a stage's own verdict, made where it was raised, is final
            return Failure(bool(getattr(link, "retryable", False)), _one_line(_text(link)), "")
        found = _retryable_sign(link)
        if found is not None:
            return Failure(True, *found)
    for link in chain:
        names = _class_names(link) | {_last_named(link)[0]}
        if names & _INPUT_OR_CONFIG:
            return Failure(False, _summary(link), "bad input or configuration; a retry would fail the same way")
        if names & ({"OSError"} | _PERMANENT_OS_ERRORS):
            return Failure(False, _summary(link), "the storage refused the request (access, a missing bucket or "
                                                  "object) or the data is damaged; a retry would fail the same way")
    # Not known to be transient, nor a known kind of bad input: most likely a bug, which a retry would repeat.
    return Failure(False, _summary(exc), f"an unexpected {type(exc).__name__}, most likely a bug; a retry would "
                                         "fail the same way")


def wrong_region(exc: BaseException) -> bool:
    """Did the object store refuse a request for being signed for another region (storage.s3_region)?"""
    return any(_WRONG_REGION.search(_text(e)) for e in _chain(exc))


def _chain(exc: BaseException) -> list[BaseException]:
    """exc, then what it was raised from or while handling, outermost first."""
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not s for s in seen) and len(seen) < 32:
        seen.append(link)
        link = link.__cause__ if link.__cause__ is not None else (
            None if link.__suppress_context__ else link.__context__)
    return seen


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _text(exc: BaseException) -> str:
    """str(exc), or what can be had: a Py4JJavaError asks its JVM for the stack trace, and the JVM may be gone."""
    try:
        return str(exc)
    except Exception:  # the JVM that held the exception is gone
        return " ".join(str(a) for a in getattr(exc, "args", ()) if isinstance(a, str))


def _jvm_gone(exc: BaseException) -> bool:
    """A py4j error that cannot even be described: the driver's JVM no longer answers."""
    if "Py4JError" not in _class_names(exc):
        return False
    try:
        str(exc)
    except Exception:
        return True
    return False


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _named_exceptions(text: str) -> list[tuple[str, str, str]]:
    """(simple name, full name, message) of each exception a traceback or stack trace in text names, in order.
    Frames (`at ...`, `File ...`) and source lines (`raise OSError(...)`) are not names."""
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Caused by: "):
            line = line[len("Caused by: "):]
        for m in _EXCEPTION_NAME.finditer(line):
            name = m.group(1)
            found.append((name.rsplit(".", 1)[-1], name, line[m.end():].lstrip(":").strip()))
    return found


_PYTHON_TRACEBACK_END = re.compile(r"Traceback \(most recent call last\):\n(?:[ \t]+[^\n]*\n|\n)*"
                                   r"((?:[a-z_]\w*\.)*[A-Z]\w*)(?::[ \t]*([^\n]*))?")


def _last_named(exc: BaseException) -> tuple[str, str, str]:
    """For Spark's wrappers, the error they wrap: the exception an executor's Python traceback ends with, else the
    outermost one the JVM's stack trace names (Spark's "Job aborted due to stage failure: ..." says why).
    ("", "", "") for other exceptions."""
    if not _class_names(exc) & _SPARK_WRAPPERS:
        return "", "", ""
    text = _text(exc)
    python = _PYTHON_TRACEBACK_END.search(text)
    if python:
        return python.group(1).rsplit(".", 1)[-1], python.group(1), (python.group(2) or "").strip()
    named = _named_exceptions(text)
    return named[0] if named else ("", "", "")


def _summary(exc: BaseException) -> str:
    """`Type: message`, one line; for Spark's wrappers, the executor's own error and who reported it."""
    _, name, message = _last_named(exc)
    if name:
        return _one_line(f"{name}: {message} ({_via(exc)})")
    text = _text(exc)
    return _one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _via(wrapper: BaseException) -> str:
    if "PythonException" in _class_names(wrapper):
        return "raised on an executor, reported by PythonException"
    return f"from Spark's {type(wrapper).__name__}"


def _retryable_sign(exc: BaseException) -> tuple[str, str] | None:
    """(summary, why) if exc itself, or a traceback or stack trace in its text, shows a transient cause."""
    names = _class_names(exc)
    text = _text(exc)
    if _jvm_gone(exc):
        return _one_line(f"{type(exc).__name__}: {text} (its JVM no longer answers)"), "the driver lost its Spark JVM"
    if not _PERMANENT_STORAGE.search(text):
        if names & _RETRYABLE_NAMES:
            return _summary(exc), _why_by_name(names)
        if "OSError" in names and not names & (_PERMANENT_OS_ERRORS | _INPUT_OR_CONFIG):
            return _summary(exc), "a storage or network error"
    for simple, name, message in _named_exceptions(text):
        if _PERMANENT_STORAGE.search(message) or simple in _PERMANENT_OS_ERRORS:
            continue
        if simple in _RETRYABLE_NAMES or simple in ("OSError", "IOError", "EnvironmentError"):
            where = f" ({_via(exc)})" if names & _SPARK_WRAPPERS else ""
            return _one_line(f"{name}: {message}{where}"), _why_by_name({simple})
    for pattern, why in _RETRYABLE_TEXT:
        if pattern.search(text):
            return _summary(exc), why
    return None


def _why_by_name(names: set[str]) -> str:
    if "DateLockedError" in names:
        return "another run holds the date, or this run lost its lock on it"
    if "S3ServerBusy" in names:
        return "another process runs the embedded S3 server on the same data folder"
    if "CatalogNotReady" in names:
        return "the catalog's snapshot is still arriving (no ready marker yet)"
    if "Py4JNetworkError" in names:
        return "the driver lost its Spark JVM"
    if "FetchFailedException" in names:
        return "a shuffle fetch failed"
    return "a storage or network error"
