"""How one reply's settings come about: cell flags, %config values, the model's own.

A mixin of QwenMagics (magics.py), which holds the magics themselves."""

from IPython.core.error import UsageError

from .settings import GenerationSettings


class SettingsMixin:
    def settings(self, thinking=None) -> GenerationSettings:
        """The settings of one reply: cell flags aside, %config values, else what the model asks for.

        ``thinking`` (a cell's --think or --no-think) overrides QwenMagics.thinking; asking a model
        whose template has no thinking switch is refused in one line.
        """
        thinking = self.thinking if thinking is None else thinking
        sampling = self._model_sampling(thinking)
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=sampling["temperature"] if self.temperature is None else self.temperature,
            top_p=sampling["top_p"] if self.top_p is None else self.top_p,
            top_k=sampling.get("top_k") if self.top_k is None else self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            thinking=thinking,
        )

    def _model_sampling(self, thinking):
        from .prompt import has_chat_template, supports_thinking
        from .settings import model_sampling

        loaded = self.loaded
        tokenizer = getattr(loaded, "tokenizer", None)
        switchable = tokenizer is not None and supports_thinking(tokenizer)
        if thinking is not None and loaded is not None and has_chat_template(tokenizer) and not switchable:
            raise UsageError(f"{loaded.name}'s chat template has no thinking switch (enable_thinking): "
                             "drop --think/--no-think, or set QwenMagics.thinking = None.")
        model = getattr(loaded, "model", None)
        config = getattr(model, "config", None)
        return model_sampling(getattr(model, "generation_config", None), getattr(config, "model_type", ""), thinking, switchable)

    def _sampling_note(self) -> str:
        """The sampling in effect, for the line %qwen_load prints."""
        try:
            settings, sampling = self.settings(), self._model_sampling(self.thinking)
        except UsageError:
            return ""
        if not settings.do_sample or settings.temperature == 0:
            return " · greedy decoding"
        source = "your settings" if self.temperature is not None or self.top_p is not None else sampling["source"]
        defaults = getattr(getattr(self.loaded, "model", None), "generation_config", None)
        top_k = settings.top_k if settings.top_k is not None else getattr(defaults, "top_k", None)
        penalty = settings.repetition_penalty if settings.repetition_penalty is not None else getattr(defaults, "repetition_penalty", None)
        extra = (f", top-k {top_k}" if top_k else "") + (f", repetition penalty {penalty:g}" if penalty not in (None, 1.0) else "")
        return f" · sampling: temperature {settings.temperature:g}, top-p {settings.top_p:g}{extra} ({source})"

    def turn_options(self, record=True):
        from .chat import TurnOptions

        return TurnOptions(
            max_turns=self.max_turns,
            max_context_tokens=self.max_context_tokens or self.loaded.context_length,
            default_system=self.system_prompt,
            show_stats=self.show_stats,
            record=record,
        )
