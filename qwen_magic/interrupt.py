"""Turn the kernel's interrupt (SIGINT: the stop button, Ctrl-C) into a polite stop request.

A KeyboardInterrupt can land anywhere, for instance halfway through sending a
display update to the front end. While a reply is generated, the first
interrupt only asks generation to stop; the reply then ends normally with what
was written so far. A second interrupt raises KeyboardInterrupt as usual.
"""

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupt_calls(stop):
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # set outside Python: restore Python's default
        previous = signal.default_int_handler

    def handler(signum, frame):
        signal.signal(signal.SIGINT, previous)
        stop()

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
