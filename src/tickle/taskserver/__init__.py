"""The task server: the fan-out tier between the notification server and its client task agents.

It receives the NS tickles, pulls the job information from the NS, tickles its agents, serves
their pulls, and caches their status events durably before forwarding them to the NS.
"""
