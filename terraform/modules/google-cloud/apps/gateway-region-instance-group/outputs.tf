output "service_account" {
  description = "The gateways' service account."
  value       = google_service_account.application
}

output "target_tags" {
  description = "Network tags of the gateways: target them in firewall rules (e.g. egress, or SSH from IAP)."
  value       = [local.network_tag]
}

output "instance_template" {
  description = "The instance template the group runs."
  value       = google_compute_instance_template.application
}

output "instance_group" {
  description = "The regional managed instance group."
  value       = google_compute_region_instance_group_manager.application
}
