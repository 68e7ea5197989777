"""The live handle of a composed model: :class:`~adapter_composer.live.composed.Composed`
(training, routing, merging, saving, undo), its per-adapter handles, hot swap and the merge
strategies of a ``sum``."""
