"""The one exception type that means "the user's input is wrong".

`main` turns it into a single ``error: ...`` line on stderr and exit status 2; every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input (config value, path, data) described in one line for the user."""
