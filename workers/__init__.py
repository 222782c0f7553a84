"""Background work beside the web processes: the rq worker that runs GC sweeps, the
scheduler that enqueues one sweep per `gc.interval`, and `python -m workers gc` for operators.
"""
