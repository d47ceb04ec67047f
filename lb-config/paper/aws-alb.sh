#!/bin/sh
# ==========================================================================
# NOT RUN: this file was not tested against the real balancer.
# ==========================================================================
# AWS Application Load Balancer settings for sse-scale, phase 1, as AWS CLI
# commands. Written from AWS and SDK documentation; check each attribute in
# the current Elastic Load Balancing docs before use.
#
# Usage: TG_ARN=arn:aws:elasticloadbalancing:... LB_ARN=arn:aws:... sh aws-alb.sh
#
# SSE timeout traps on ALB:
# - idle_timeout.timeout_seconds (load balancer attribute) defaults to 60 s:
#   a connection with no data for 60 s is closed. Heartbeats every
#   SSE_HEARTBEAT_SECS (default 15) keep streams under it; raise it (below)
#   if you raise the heartbeat to 60 s or more, and keep the heartbeat well
#   below whatever value you set. (AWS allows up to 4000 s per secondary
#   sources; not checked against AWS's own page here.)
# - deregistration_delay.timeout_seconds (target group, default 300 s): how
#   long a deregistering target keeps in-flight requests. An open stream is
#   an in-flight request; the app closes its streams within
#   SHUTDOWN_DRAIN_SECS after SIGTERM, so the delay only needs to exceed
#   SHUTDOWN_GRACE_SECS. What ALB does with a request still open when the
#   delay expires was not verified here.
# - Targets are reached over HTTP/1.1 by default (target group protocol
#   version HTTP1); keep it. ALB does not compress responses.
#
# Stickiness (target group attributes):
# - stickiness.type=lb_cookie: ALB issues its own AWSALB cookie for
#   stickiness.lb_cookie.duration_seconds (default 86400).
# - stickiness.type=app_cookie: ALB follows the app's cookie
#   (stickiness.app_cookie.cookie_name=sse_affinity, the app sets it on
#   POST /sessions and on every stream open) and adds its own AWSALBAPP-*
#   cookies that name the target; the AWSALB, AWSALBAPP and AWSALBTG name
#   prefixes are reserved. ALB does not read the instance name from
#   sse_affinity, so INSTANCE_ID naming does not matter here.
# - If the pinned target is unhealthy or deregistering, ALB routes to a
#   healthy target and re-pins (failover and drain). Health check /readyz:
#   503 from SIGTERM on. A reconnect that reaches a target after SIGTERM but
#   before it is marked unhealthy gets 503, which EventSource treats as
#   final: deregister the target first, then stop the instance.
#
# Deploy: deregister the target (aws elbv2 deregister-targets), which sends
# new and sticky requests elsewhere, then SIGTERM the instance; register the
# new one when /readyz answers 200.

set -eu
: "${TG_ARN:?set TG_ARN to the target group ARN}"
: "${LB_ARN:?set LB_ARN to the load balancer ARN}"

aws elbv2 modify-target-group-attributes --target-group-arn "$TG_ARN" --attributes \
  Key=stickiness.enabled,Value=true \
  Key=stickiness.type,Value=app_cookie \
  Key=stickiness.app_cookie.cookie_name,Value=sse_affinity \
  Key=stickiness.app_cookie.duration_seconds,Value=86400 \
  Key=deregistration_delay.timeout_seconds,Value=45
# lb_cookie instead:
#   Key=stickiness.type,Value=lb_cookie Key=stickiness.lb_cookie.duration_seconds,Value=86400

aws elbv2 modify-target-group --target-group-arn "$TG_ARN" \
  --health-check-path /readyz \
  --health-check-interval-seconds 5 \
  --healthy-threshold-count 2 \
  --unhealthy-threshold-count 2 \
  --matcher HttpCode=200

aws elbv2 modify-load-balancer-attributes --load-balancer-arn "$LB_ARN" --attributes \
  Key=idle_timeout.timeout_seconds,Value=300
