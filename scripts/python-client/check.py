"""Calls the agent with a client generated from proto/ alone (grpcio):
GetStatus, a server stream (WatchEvents), Health (overall and per service)
and reflection, over the Unix socket given as argv[1], on a stock channel
with no options. Exits non-zero on any failure."""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from instance_agent.v1 import agent_pb2, agent_pb2_grpc

socket = sys.argv[1]
# No channel options: grpcio (>= 1.57) then sends the URL-encoded socket
# path as :authority, which h2 alone would refuse (hyperium/h2#487); the
# agent rewrites it on the Unix socket (src/api/authority.rs). Setting
# grpc.default_authority to "localhost" works too and stays optional.
print(f"grpcio {grpc.__version__}")
channel = grpc.insecure_channel(f"unix://{socket}")

status = agent_pb2_grpc.AgentServiceStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
assert status.version, status
assert [c.type for c in status.conditions] == ["docker", "disk", "mounts", "setup", "ssh", "store"], status.conditions
print(f"GetStatus: version {status.version}, {status.host.usable_cores} cores, summary {status.summary!r}")

# A server stream: the backlog from the start holds the agent's "started" event.
events = agent_pb2_grpc.AgentServiceStub(channel).WatchEvents(agent_pb2.WatchEventsRequest(since=0), timeout=5)
first = next(events)
assert first.sequence >= 1, first
events.cancel()
print(f"WatchEvents: first event #{first.sequence} ({first.WhichOneof('kind')})")

health = health_pb2_grpc.HealthStub(channel)
for service in ["", "instance_agent.v1.AgentService", "instance_agent.v1.JobService"]:
    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, (service, reply)
print("Health: SERVING overall and per service")

stub = reflection_pb2_grpc.ServerReflectionStub(channel)
replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
names = sorted(s.name for r in replies for s in r.list_services_response.service)
for expected in ["AgentService", "JobService", "ImageService", "AppService", "DiskService", "SetupService", "MountService", "AccessService", "LifecycleService"]:
    assert f"instance_agent.v1.{expected}" in names, names
print("reflection:", ", ".join(names))
