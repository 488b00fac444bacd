"""The model runner child, `python -m nodeagent.runner` (__main__.py): one loaded model, its
generation (generate, chat, tools), its request bodies and their checks (wire, schema: the agent
decodes them first) and its load record (loadrecord: the agent reads it back)."""
