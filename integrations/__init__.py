"""Optional integrations with other training stacks (TRL). Built on the runtime library only."""
