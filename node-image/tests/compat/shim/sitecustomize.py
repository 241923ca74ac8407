# dispy 4.15.2 (the PyPI release) still calls inspect.getargspec, removed in Python 3.11;
# dispy's git HEAD has the fix. This restores the name for the client in the tests.
import inspect

if not hasattr(inspect, "getargspec"):
    import collections

    ArgSpec = collections.namedtuple("ArgSpec", "args varargs keywords defaults")

    def getargspec(func):
        spec = inspect.getfullargspec(func)
        return ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)

    inspect.getargspec = getargspec
