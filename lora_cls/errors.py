"""The one error type for user mistakes (docs/DESIGN.md §8).

Raised anywhere a user's input is wrong; the CLI wrapper turns it into `error: <message>` on stderr and exit
status 2. Anything else is an internal error and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: bad config value, missing data, unreadable image, wrong checkpoint."""
