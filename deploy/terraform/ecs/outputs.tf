output "task_definition_arn" {
  description = "ARN (with revision) of the task definition: app + Gatehouse sidecar + init container."
  value       = aws_ecs_task_definition.this.arn
}

output "service_name" {
  description = "Name of the ECS service."
  value       = aws_ecs_service.this.name
}

output "security_group_id" {
  description = "Security group of the tasks. Pass it to peers' allowed_source_security_group_ids to let this service call them."
  value       = aws_security_group.service.id
}

output "execution_role_arn" {
  description = "ARN of the execution role (reads only this service's Gatehouse secrets)."
  value       = aws_iam_role.execution.arn
}

output "audit_log_group_name" {
  description = "CloudWatch log group with the sidecar's audit log (stream prefix `sidecar`, one JSON line per decision) and the init container's output (prefix `init`)."
  value       = aws_cloudwatch_log_group.sidecar.name
}

output "app_log_group_name" {
  description = "CloudWatch log group of the application container."
  value       = aws_cloudwatch_log_group.app.name
}

output "denied_requests_metric" {
  description = "CloudWatch metric (namespace/name) counting denied requests, for alarms."
  value       = "Gatehouse/${var.name}/DeniedRequests"
}

output "sidecar_config" {
  description = "The rendered sidecar.toml, for review (contains no secrets)."
  value       = local.sidecar_toml
}
