"""Adapters that let agent frameworks keep their sessions in the store: each module needs
its framework, installed with the extra of the same name (`aisopod-session[openai-agents]`)
and imported only when its module is."""
