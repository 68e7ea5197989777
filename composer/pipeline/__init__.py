"""The staged pipeline, in order: ``graph`` (what the user declares) → ``resolve`` (targets to
sites) → ``validate`` with ``rules`` (every diagnostic at once) → ``plan`` (frozen programs per
site) → ``apply`` (the only code that patches a model). Each stage can be run and printed alone."""
