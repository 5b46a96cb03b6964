"""SQL files (schema, views, macros, examples) loaded by dynstore connections."""
