"""Conversations on disk: autosave, --load, --save and --export with their pictures.

A mixin of QwenMagics (magics.py), which holds the magics themselves."""

import os

from IPython.core.error import UsageError

from .conversation import Conversation, HistoryError


class FilesMixin:
    def _autosave(self):
        """Write every conversation to QwenMagics.autosave; a failure is reported once and the chat goes on."""
        if not self.autosave:
            return
        from .persistence import dumps_all, write_atomic

        try:
            write_atomic(self.autosave, dumps_all(self.conversations))
        except OSError as error:
            if self._autosave_failed != self.autosave:
                self._autosave_failed = self.autosave
                print(f"Warning: cannot autosave to {self.autosave} ({error.strerror or error}); "
                      "the chat goes on unsaved, and what was saved there before is untouched.")
            return
        if self._autosave_failed == self.autosave:
            print(f"Autosaving to {self.autosave} works again.")
        self._autosave_failed = None

    def _load_history(self, path, chat):
        from .persistence import loads

        try:
            with open(os.path.expanduser(path), encoding="utf-8") as file:
                loaded = loads(file.read())
        except OSError as error:
            raise UsageError(f"Cannot read {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not a UTF-8 text file; the conversation is unchanged.") from None
        except HistoryError as error:
            raise UsageError(f"{path} is not a conversation ({error}); the conversation is unchanged.") from None
        if isinstance(loaded, dict):
            self.conversations.update(loaded)
            self.conversations.setdefault("", Conversation())
            names = ", ".join(repr(name) if name else "the default" for name in loaded)
            print(f"Restored {len(loaded)} conversation{'s' if len(loaded) != 1 else ''} from {path}: {names}.")
        else:
            self.conversations[chat] = loaded
            print(f"Loaded {len(loaded.exchanges)} exchanges from {path}.")

    def _write_images(self, export_path, images):
        """Each picture as STEM-HASH12.png beside the transcript; their names relative to it."""
        from .persistence import write_bytes_atomic

        stem = os.path.splitext(os.path.basename(export_path))[0]
        folder = os.path.dirname(os.path.expanduser(export_path))
        files = {}
        for name, png in images.items():
            files[name] = f"{stem}-{name[:12]}.png"
            try:
                write_bytes_atomic(os.path.join(folder, files[name]), png)
            except OSError as error:
                raise UsageError(f"Cannot write {files[name]} beside {export_path}: {error.strerror or error}") from None
        return files

    def _write(self, path, text):
        from .persistence import write_atomic

        try:
            write_atomic(path, text)
        except OSError as error:
            raise UsageError(f"Cannot write {path}: {error.strerror or error}") from None
